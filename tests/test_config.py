import subprocess
import sys

import pytest

from phyassist.config import ConfigError, list_profiles, load_config, parse_override, to_yaml
from phyassist.runinfo import write_run_info


@pytest.mark.parametrize("profile", ["smoke", "paper", "single-gpu"])
def test_profiles_validate(profile):
    cfg = load_config(profile)
    assert cfg.name == profile


def test_profiles_listed():
    assert {"smoke", "paper", "single-gpu"} <= set(list_profiles())


def test_inheritance_single_gpu_from_paper():
    cfg = load_config("single-gpu")
    assert cfg.model.name == "mixtral-8x7b-instruct"
    assert cfg.model.max_memory_per_gpu is None and cfg.model.num_gpus == 1
    assert cfg.train.lora.r == 32 and cfg.train.max_steps == 660 and cfg.train.flat_optimizer
    # 80 GB keep every activation: nothing recomputed, the attention half still compiled
    assert cfg.train.gradient_checkpointing is False and cfg.train.compile_attention
    # a nested section merges: the experts' GEMM changes, the rest of model.quant is paper's
    assert cfg.model.quant.expert_gemm == "per_expert" and cfg.model.quant.experts_method == "grouped"
    assert load_config("paper").model.quant.expert_gemm == "grouped"


def test_overrides_parse_as_yaml():
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    cfg = load_config("smoke", ["train.max_steps=3", "train.lora.r=4", "wandb.tags=[a, b]"])
    assert cfg.train.max_steps == 3 and cfg.train.lora.r == 4 and cfg.wandb.tags == ["a", "b"]


def test_unknown_key_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learnin_rate: unknown key"):
        load_config(p)


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"train\.max_grad_norm.*'abc'"):
        load_config("smoke", ["train.max_grad_norm=abc"])


def test_bad_value_named():
    with pytest.raises(ConfigError, match=r"train\.lora\.dropout"):
        load_config("smoke", ["train.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"model\.quant\.quant_type"):
        load_config("smoke", ["model.quant.quant_type=int3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match="key=value"):
        load_config("smoke", ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("paper", ["train.max_steps=7"])
    out = write_run_info(cfg, tmp_path)
    again = load_config(out / "config.resolved.yaml")
    assert again == cfg
    import json
    assert "transformers" in json.loads((out / "versions.json").read_text())
    assert "max_steps: 7" in to_yaml(cfg)


def test_cli_reports_config_error():
    r = subprocess.run([sys.executable, "-m", "phyassist", "data", "--config", "smoke", "train.nope=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.nope: unknown key" in r.stderr


def test_cli_lists_models():
    r = subprocess.run([sys.executable, "-m", "phyassist", "models"], capture_output=True, text=True)
    assert r.returncode == 0 and "mixtral-8x7b-instruct" in r.stdout and "smollm2-135m-instruct" in r.stdout


def test_overrides_reach_list_items():
    cfg = load_config("smoke", ["data.sources.0.path=my/dr.csv", "data.sources.5.n_rows=7"])
    assert cfg.data.sources[0].path == "my/dr.csv" and cfg.data.sources[5].n_rows == 7
    assert cfg.data.sources[1].path is None  # the other items are untouched
    cfg = load_config("smoke", {"data.sources.1.name": "dreaddit2"})  # the notebooks' dict form
    assert cfg.data.sources[1].name == "dreaddit2"
    with pytest.raises(ConfigError, match=r"data\.sources\.9\.path: index 9 is past the end of a list of 6"):
        load_config("smoke", ["data.sources.9.path=x.csv"])
    with pytest.raises(ConfigError, match=r"data\.sources\.first\.path: 'first' is not an index"):
        load_config("smoke", ["data.sources.first.path=x.csv"])
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.nope: unknown key"):
        load_config("smoke", ["data.sources.0.nope=1"])


def test_missing_file_named_as_the_user_wrote_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phyassist", "data", "--config", "smoke", "-o", str(tmp_path),
                        "data.sources.0.path=my_data/dr.csv"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "error: my_data/dr.csv: file not found (source 'DR') (looked in " in r.stderr, r.stderr
    assert "data/sample/my_data" in r.stderr  # where it looked is said after the path as written
