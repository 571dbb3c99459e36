"""The command line as a new user meets it: help with an example and the output layout, model
names refused before any network call, third-party notices filtered unless --verbose."""

import io
import subprocess
import sys

import pytest

from phyassist.cli import STAGES, build_parser, top_parser
from phyassist.console import NoiseFilter, quiet_output


def _run(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "phyassist", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_has_an_example_and_the_output_layout(stage):
    text = build_parser(stage).format_help()
    assert f"example:\n  python -m phyassist {stage}" in text or f"python -m phyassist {stage} " in text
    assert "writes:\n" in text
    flags = {a.dest for a in build_parser(stage)._actions}
    # models reads no run config: no --config, --output-dir or key=value to ignore; score reads one only
    # to rescore answer files (--config ... --answers), so its --config has no default
    assert ("config" in flags and "overrides" in flags) == bool(STAGES[stage].uses_config)
    config = next((a for a in build_parser(stage)._actions if a.dest == "config"), None)
    if STAGES[stage].uses_config == "optional":
        assert config.default is None


def test_top_level_help_speaks_to_users():
    text = top_parser().format_help()
    assert "main(cfg" not in text and "python -m phyassist run" in text and "--help" in text
    for stage, s in STAGES.items():
        assert f"  {stage:<9} {s.summary}" in text


def test_models_takes_no_config_flags():
    r = _run("models", "--config", "smoke")
    assert r.returncode == 2 and "unrecognized arguments: --config" in r.stderr


def test_misspelt_model_refused_with_close_matches_before_any_network():
    r = _run("data", "--config", "smoke", "model.name=llama2-70b-chat", env={"HF_HUB_OFFLINE": "0"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
    assert "model.name 'llama2-70b-chat': not in the registry" in r.stderr and "'llama-2-70b-chat'" in r.stderr


def test_unknown_hub_id_offline_says_offline(tmp_path):
    r = _run("train", "--config", "smoke", "-o", str(tmp_path), "model.name=nobody/no-such-model")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "offline (HF_HUB_OFFLINE=1)" in r.stderr and "not in the local Hugging Face cache" in r.stderr


def test_check_model_name_in_process(tmp_path, monkeypatch):
    from phyassist.models.registry import ModelNotFound, check_model_name

    assert check_model_name(str(tmp_path)) is None  # a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model_name("someone/some-model") == "someone/some-model"  # online: left to the Hub
    assert check_model_name("mixtral-8x7b-instruct") == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    with pytest.raises(ModelNotFound, match="did you mean 'smollm2-135m-instruct'"):
        check_model_name("smollm2")
    with pytest.raises(OSError):  # callers that fall back on transformers' OSError fall back on this too
        check_model_name("./no/such/folder")


BANNER = ("wandb: Tracking run with wandb version 0.31.0\n"
          "wandb: W&B syncing is set to `offline` in this directory.\n"
          "[INFO] Running in WANDB offline mode\n"
          "Failed to load CPU gemm_4bit_forward from kernels-community: Cannot find a build variant. "
          "Please make sure you already `pip install kernels`\n")


def test_noise_filtered_and_progress_bars_kept():
    out = io.StringIO()
    f = NoiseFilter(out)
    f.write("[data] DR: 10 rows\n" + BANNER[:30])
    f.write(BANNER[30:] + " 50%|█████     | 1/2\r")
    # the bar shows before its line ends
    assert out.getvalue() == "[data] DR: 10 rows\n 50%|█████     | 1/2\r"
    f.write("100%|██████████| 2/2\n"
            "[IPKernelApp] WARNING | Kernel is running over TCP without encryption. x\nend")
    f.close_line()
    assert out.getvalue().endswith("100%|██████████| 2/2\nend")


def test_quiet_output_restores_streams_and_verbose_keeps_all(capsys):
    before = sys.stdout
    with quiet_output():
        print("[INFO] Running in WANDB offline mode")
        print("kept")
    assert sys.stdout is before and capsys.readouterr().out == "kept\n"
    with quiet_output(verbose=True):
        print("[INFO] Running in WANDB offline mode")
    assert capsys.readouterr().out == "[INFO] Running in WANDB offline mode\n"


def test_run_only_refuses_an_override_it_swallowed():
    r = _run("run", "--only", "01_data.ipynb", "train.max_steps=1")
    assert r.returncode == 2 and "'train.max_steps=1' is not a notebook" in r.stderr
