"""Publishing stage: package + model card (dry run), load-back check, Hub upload with a mocked
HfApi and its error paths, the patient-adapter refusal, and adapter merging. Offline, on the
embedded default (non-quantized so logits compare exactly) with LoRA adapters made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from phyassist.cli import main as cli_main
from phyassist.config import load_config
from phyassist.publish import hub
from phyassist.publish.package import (PATIENT_MARKER_FILE, PATIENT_MARKER_KEY, PatientAdapterError,
                                       PublishError, mark_patient_adapter)

FP = ["model.quant.load_in_4bit=false"]
PROMPTS = ["publish.check_prompts=['I feel anxious before exams.', 'Is this post about stress? I cannot sleep.']"]
SMOL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SETS = ["DR", "dreaddit", "Irf", "MultiWD", "SAD"]


def make_cfg(out: Path, extra=()):
    return load_config("smoke", FP + PROMPTS + [f"output_dir={out}"] + list(extra))


def make_adapter(cfg, path: Path, seed: int, r: int = 8):
    """A LoRA adapter with random non-zero B (a fresh one is a no-op and could not fail a check)."""
    from peft import LoraConfig, get_peft_model

    from phyassist.models.loading import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(cfg.model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(path)
    return model.eval()


def write_eval(out: Path):
    """The evaluation stage's comparison table (eval/comparison.csv/.md), BARTScore n/a for one set."""
    rows = ["set,system,n,weighted_f1,bartscore,bleu"]
    for i, s in enumerate(SETS):
        rows.append(f"{s},base,10,{40 + i},{-4.0 - i / 10},1.0")
        rows.append(f"{s},finetuned,10,{60 + i},{'' if s == 'SAD' else -3.0 - i / 10},2.0")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "comparison.csv").write_text("\n".join(rows) + "\n")
    (out / "eval" / "comparison.md").write_text("| set | system | weighted_f1 |\n|---|---|---|\n| DR | finetuned | 60 |\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from phyassist.runinfo import write_run_info

    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(out)
    write_run_info(cfg)
    model = make_adapter(cfg, out / "adapter", seed=1)
    write_eval(out)
    return SimpleNamespace(out=out, cfg=cfg, model=model)


def cli(out: Path, *args) -> int:
    return cli_main(["publish", "--config", "smoke", "--output-dir", str(out), *args, *FP, *PROMPTS])


# ---------------------------------------------------------------- dry run, card

def test_dry_run_builds_folder_with_valid_card(run, capsys):
    from huggingface_hub import ModelCard

    assert cli(run.out, "--dry-run") == 0
    printed = capsys.readouterr().out
    pkg = run.out / "publish" / "package"
    assert "load-back check PASS" in printed and "dry run: would upload to" in printed
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
                 "chat_template.jinja", "config.resolved.yaml", "eval/comparison.csv", "eval/comparison.md"):
        assert (pkg / name).is_file(), name
        assert name in printed
    card = ModelCard.load(pkg / "README.md")
    assert card.data.base_model == SMOL_HUB_ID
    assert card.data.library_name == "peft" and card.data.license == "mit"
    assert card.data.datasets == ["nbertagnolli/counsel-chat"]
    f1 = {r.dataset_config: r.metric_value for r in card.data.eval_results if r.metric_type == "f1"}
    bart = {r.dataset_config: r.metric_value for r in card.data.eval_results if r.metric_type == "bartscore"}
    assert f1 == {s: 60.0 + i for i, s in enumerate(SETS)}  # the fine-tuned rows, not the base rows
    assert set(bart) == set(SETS) - {"SAD"} and bart["DR"] == -3.0
    text = card.text
    for needle in ("Not for clinical use", "load_in_4bit=True", "MIT", "github.com/SteveKGYang/MentalLLaMA",
                   "paged" if run.cfg.train.optim.startswith("paged") else run.cfg.train.optim, "| DR | 60.00 | -3.00 |"):
        assert needle in text, needle
    assert json.loads((pkg / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL_HUB_ID


def test_eval_report_missing_or_optional(tmp_path, run, capsys):
    shutil.copytree(run.out / "adapter", tmp_path / "adapter")
    assert cli(tmp_path, "--dry-run", "--skip-load-back") == 1
    assert "no evaluation report" in capsys.readouterr().err
    assert cli(tmp_path, "--dry-run", "--skip-load-back", "publish.eval_optional=true") == 0
    assert "published without an evaluation report" in (tmp_path / "publish/package/README.md").read_text()


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    assert cli(tmp_path, "--dry-run") == 1
    err = capsys.readouterr().err
    assert "no adapter here" in err and "train" in err
    assert not (tmp_path / "publish").exists()


@pytest.mark.parametrize("marker", ["file", "config"])
def test_patient_adapter_is_refused(tmp_path, run, marker, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run.out / "adapter", adapter)
    if marker == "file":
        (adapter / PATIENT_MARKER_FILE).write_text("x")
    else:
        data = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(data | {PATIENT_MARKER_KEY: True}))
    write_eval(tmp_path)
    assert cli(tmp_path, "--dry-run", "--skip-load-back") == 1
    assert "patient notes" in capsys.readouterr().err
    assert not (tmp_path / "publish").exists()


def test_card_validation_catches_bad_metadata():
    from phyassist.publish.card import CardError, validate_card

    good = "---\nbase_model: a/b\nlibrary_name: peft\nlicense: mit\n---\ntext"
    assert validate_card(good)["license"] == "mit"
    with pytest.raises(CardError, match="not a Hub license id"):
        validate_card(good.replace("license: mit", "license: my-own"))
    with pytest.raises(CardError, match="base_model missing"):
        validate_card(good.replace("base_model: a/b\n", ""))
    with pytest.raises(CardError, match="not a number"):
        validate_card(good.replace("---\ntext", "model-index:\n- name: m\n  results:\n  - task: {type: t}\n"
                                   "    dataset: {type: d, name: D}\n    metrics: [{type: f1, value: high}]\n---\n"))


def test_eval_table_formats(tmp_path):
    from phyassist.publish.report import ReportError, read_scores

    long = tmp_path / "long.csv"
    long.write_text("dataset,model,metric,value\nDR,fine-tuned,Weighted F1,70\nDR,fine-tuned,BARTScore,n/a\n"
                    "DR,base,Weighted F1,10\nmean,fine-tuned,Weighted F1,70\n")
    assert [(s.set, s.metric, s.value) for s in read_scores(long)] == [("DR", "weighted_f1", 70.0)]
    with pytest.raises(ReportError, match="no rows with"):
        read_scores(long, "merged")
    bad = tmp_path / "bad.csv"
    bad.write_text("set,system,bleu\nDR,finetuned,3\n")
    with pytest.raises(ReportError, match="no weighted F1 or BARTScore column"):
        read_scores(bad)


# ---------------------------------------------------------------- load-back check

def test_load_back_gives_same_logits_and_can_fail(run, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from phyassist.models.loading import load_tokenizer
    from phyassist.publish.loadback import load_adapter_offline, load_back_check
    from phyassist.publish.stage import make_package

    pkg = make_package(run.cfg, dest=tmp_path / "pkg").path
    tok = load_tokenizer(run.cfg.model)
    loaded = load_adapter_offline(run.cfg, pkg)
    prompts = run.cfg.publish.check_prompts
    result = load_back_check(run.model, tok, loaded, AutoTokenizer.from_pretrained(pkg), prompts, atol=1e-5)
    assert result.ok and result.tokens_match, result.summary()
    assert result.comparison.max_abs_diff <= 1e-5 and result.comparison.next_token_agreement == 1.0

    weights = pkg / "adapter_model.safetensors"  # a slightly different adapter must fail the check
    state = load_file(weights)
    save_file({k: v * 1.05 if "lora_B" in k else v for k, v in state.items()}, weights)
    bad = load_back_check(run.model, tok, load_adapter_offline(run.cfg, pkg), tok, prompts, atol=1e-5)
    assert not bad.ok and bad.comparison.max_abs_diff > 1e-3


# ---------------------------------------------------------------- real run, mocked Hub

class FakeApi:
    def __init__(self, who=None, fail=None):
        self.who = who or {"name": "alice", "orgs": [{"name": "counsel-lab"}]}
        self.fail, self.calls = fail, []

    def whoami(self, token=None):
        if self.fail:
            raise self.fail
        return self.who

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        self.calls.append(("upload_folder", kw, sorted(p.name for p in folder.iterdir()),
                           (folder / "README.md").read_text()))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc")


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    validated = []
    monkeypatch.setattr(hub, "validate_online", validated.append)
    return validated


def test_real_run_uploads_with_mocked_api(run, tmp_path, online, capsys):
    from phyassist.publish.stage import publish

    api = FakeApi()
    res = publish(run.cfg, dry_run=False, dest=tmp_path / "pkg", load_back=False, api=api)
    (_, repo_id, create_kw), (_, upload_kw, files, card_text) = api.calls
    assert repo_id == "alice/phyassist-smoke" and create_kw["private"] is True and create_kw["exist_ok"]
    assert upload_kw["commit_message"] == run.cfg.publish.commit_message
    assert {"adapter_model.safetensors", "README.md", "eval"} <= set(files)
    assert 'PeftModel.from_pretrained(base, "alice/phyassist-smoke")' in card_text and online
    assert res["uploaded"] and "https://huggingface.co/alice/phyassist-smoke" in capsys.readouterr().out

    org = FakeApi()
    publish(run.cfg, dry_run=False, dest=tmp_path / "pkg", load_back=False, api=org, repo_id="counsel-lab/x",
            private=False)
    assert org.calls[0][1] == "counsel-lab/x" and org.calls[0][2]["private"] is False


def test_real_run_error_paths(run, tmp_path, online, monkeypatch):
    import httpx2
    import huggingface_hub

    from phyassist.publish.stage import publish

    def go(api, **kw):
        return publish(run.cfg, dry_run=False, dest=tmp_path / "pkg", load_back=False, api=api, **kw)

    other = FakeApi()
    with pytest.raises(PublishError, match="belongs to 'bob'"):
        go(other, repo_id="bob/model")
    assert other.calls == [] and not (tmp_path / "pkg").exists()  # nothing built, nothing sent
    with pytest.raises(PublishError, match="no network"):
        go(FakeApi(fail=httpx2.ConnectError("name resolution failed")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE=1"):
        go(FakeApi())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token.*notebook_login"):
        go(FakeApi())


# ---------------------------------------------------------------- merging

def lora_deltas(cfg, adapter: Path) -> dict:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from phyassist.models.loading import load_model

    model = PeftModel.from_pretrained(load_model(cfg.model), str(adapter))
    return {n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two adapters on the tiny random Mixtral: merging is about LoRA weights, not model size."""
    out = tmp_path_factory.mktemp("tiny")
    cfg = load_config("smoke", FP + PROMPTS + [f"output_dir={out}", "model.name=tiny-mixtral"])
    model = make_adapter(cfg, out / "adapter", seed=1)
    make_adapter(cfg, out / "b", seed=2)
    return SimpleNamespace(out=out, cfg=cfg, model=model)


def test_merging_cat_is_exact_and_ties_dare_run(tiny, tmp_path):
    from phyassist.publish.merge import merge_adapters

    cfg = tiny.cfg
    a, b = tiny.out / "adapter", tiny.out / "b"
    da, db = lora_deltas(cfg, a), lora_deltas(cfg, b)

    cat = merge_adapters(cfg, [a, b], tmp_path / "cat", [0.7, 0.3], "cat")
    dcat = lora_deltas(cfg, cat)  # the merged folder loads like any trained adapter
    assert dcat.keys() == da.keys()
    for k in da:
        torch.testing.assert_close(dcat[k], 0.7 * da[k] + 0.3 * db[k], atol=1e-6, rtol=1e-4)
    info = json.loads((cat / "merge_info.json").read_text())
    assert info["combination"] == "cat" and info["weights"] == [0.7, 0.3]

    ties = lora_deltas(cfg, merge_adapters(cfg, [a, b], tmp_path / "ties", [0.5, 0.5], "ties", density=0.5))
    d1 = lora_deltas(cfg, merge_adapters(cfg, [a, b], tmp_path / "dare1", [0.5, 0.5], "dare_ties"))
    d2 = lora_deltas(cfg, merge_adapters(cfg, [a, b], tmp_path / "dare2", [0.5, 0.5], "dare_ties"))
    k = next(iter(da))
    assert not torch.allclose(ties[k], dcat[k]) and ties[k].abs().sum() > 0
    assert all(torch.equal(d1[n], d2[n]) for n in d1)  # DARE is seeded: same config, same adapter


def test_merge_cli_errors_and_patient_marker(tiny, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(tiny.out / "b", b)
    mark_patient_adapter(b)
    out = tmp_path / "m"
    assert cli(tmp_path, "--merge", f"{tiny.out / 'adapter'},{b}", "--weights", "0.5,0.5",
               "--combination", "linear", "--merge-out", str(out), "model.name=tiny-mixtral") == 0
    assert (out / PATIENT_MARKER_FILE).exists()  # a merge of a patient adapter stays unpublishable
    with pytest.raises(PatientAdapterError):
        from phyassist.publish.package import check_adapter
        check_adapter(out)
    assert cli(tmp_path, "--merge", f"{tiny.out / 'adapter'},{b}", "--weights", "1") == 1
    assert "1 value(s) for 2 adapter(s)" in capsys.readouterr().err
    assert cli(tmp_path, "--merge", f"{tiny.out / 'adapter'},{b}", "--combination", "linear",
               "--density", "0.3", "model.name=tiny-mixtral") == 1
    assert "density applies to" in capsys.readouterr().err


def test_export_merged_full_model_matches_adapter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from phyassist.models.loading import load_tokenizer
    from phyassist.publish.loadback import compare_logits, encode_prompts, prompt_logits
    from phyassist.publish.merge import export_merged_model

    # the 4-bit profile: the export warns, and merges into a 16-bit copy of the base
    cfg4 = load_config("smoke", PROMPTS + [f"output_dir={tiny.out}", "model.name=tiny-mixtral"])
    with pytest.warns(UserWarning, match="lossy"):
        out = export_merged_model(cfg4, tiny.out / "adapter", tmp_path / "full", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = encode_prompts(load_tokenizer(cfg4.model), cfg4.publish.check_prompts)
    c = compare_logits(prompt_logits(tiny.model, ids), prompt_logits(merged, ids))
    assert c.max_abs_diff < 1e-3 and c.next_token_agreement == 1.0
