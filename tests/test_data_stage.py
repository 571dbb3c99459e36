"""The data stage end to end on the bundled sample, gen_csv, bad input, and the real data."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phyassist.config import load_config
from phyassist.data.records import DataError
from phyassist.data.stage import prepare
from phyassist.io import read_jsonl
from phyassist.models.loading import load_tokenizer
from phyassist.paths import REPO_ROOT, SAMPLE_DIR

GEN_CSV = REPO_ROOT / "scripts" / "gen_csv.py"
sys.path.insert(0, str(GEN_CSV.parent))
import gen_csv  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_config("smoke").model)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config("smoke", {"output_dir": str(out)})
    return cfg, prepare(cfg, tokenizer=tok)


def test_outputs_and_record_interface(smoke):
    cfg, res = smoke
    d = cfg.out / "data"
    for name in ("train.jsonl", "val.jsonl", "train.csv", "val.csv", "cleaning_report.json",
                 "cleaning_report.md", "removed.jsonl", "token_lengths.png"):
        assert (d / name).is_file(), name
    train = read_jsonl(d / "train.jsonl")
    assert len(train) == res["train"] and res["val"] == len(read_jsonl(d / "val.jsonl")) > 0
    for r in train:
        assert {"source", "question", "answer", "prompt", "completion", "text"} <= set(r)
        assert r["text"] == r["prompt"] + r["completion"] and r["answer"] in r["completion"]
    with open(d / "train.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["text"] and [r["text"] for r in rows] == [r["text"] for r in train]


def test_every_planted_problem_is_reported(smoke):
    _, res = smoke
    rep = res["report"]
    assert rep["removed"] == {
        "held_out_split": {"counsel-chat": 1}, "empty": {"counsel-chat": 1},
        "links": {"DR": 1, "counsel-chat": 1}, "exact_duplicate": {"dreaddit": 1, "counsel-chat": 1},
        "near_duplicate": {"counsel-chat": 1}, "test_overlap": {"SAD": 1}}
    assert rep["repaired"]["mojibake"] == {"MultiWD": 1} and rep["repaired"]["control_chars"] == {"counsel-chat": 1}
    for name, s in rep["sources"].items():  # nothing dropped silently
        removed = sum(v.get(name, 0) for v in rep["removed"].values())
        assert s["raw"] - removed == s["kept"] == s["sampled"], name
    assert rep["examples"]["links"]["DR"][0]["origin"] == "DR/train.csv:7"
    assert any("Irf: train split missing" in n for n in rep["notes"])
    md = Path(res["files"]["report_md"]).read_text()
    assert "| removed: links | 1 | 0 | 0 | 0 | 0 | 1 | 2 |" in md


def test_splits_by_group_and_leakage_clean(smoke):
    cfg, res = smoke
    from phyassist.data.sources import group_of
    from phyassist.data.records import Row

    d = cfg.out / "data"
    key = lambda r: group_of(Row(r["source"], r["question"], r["answer"], r["origin"]))  # noqa: E731
    train, val = read_jsonl(d / "train.jsonl"), read_jsonl(d / "val.jsonl")
    # Irf/MultiWD ask several questions about one post: the post's rows stay together
    assert not {key(r) for r in train if r["source"] != "counsel-chat"} & {key(r) for r in val}
    leak = res["report"]["leakage"]["train_vs_test"]
    assert set(leak) >= {"DR", "dreaddit", "Irf", "MultiWD", "SAD"}
    assert all(v["normalised_post"] == 0 and v["exact_question"] == 0 for v in leak.values())


def test_leakage_reported_when_not_dropped(tmp_path, tok):
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "data.cleaning.drop_test_overlap": False,
                                "data.val_fraction": 0})
    leak = prepare(cfg, tokenizer=tok)["report"]["leakage"]["train_vs_test"]["SAD"]
    assert leak["exact_question"] == 1 and leak["normalised_post"] == 1
    assert leak["examples"][0]["test"] == "test_instruction/SAD.csv:2"


def test_seeded_mix_reproducible(tmp_path, tok):
    over = {"data.sources": [{"name": "SAD", "n_rows": 3}, {"name": "DR", "n_rows": 2}]}
    a = prepare(load_config("smoke", {**over, "output_dir": str(tmp_path / "a")}), tokenizer=tok)
    b = prepare(load_config("smoke", {**over, "output_dir": str(tmp_path / "b")}), tokenizer=tok)
    c = prepare(load_config("smoke", {**over, "seed": 7, "output_dir": str(tmp_path / "c")}), tokenizer=tok)
    read = lambda r, f: Path(r["files"][f]).read_text()  # noqa: E731
    assert read(a, "train_jsonl") == read(b, "train_jsonl") and read(a, "val_jsonl") == read(b, "val_jsonl")
    assert a["report"]["sources"]["SAD"]["sampled"] == 3 and a["report"]["sources"]["DR"]["sampled"] == 2
    pick = lambda r: sorted(x["origin"] for f in ("train_jsonl", "val_jsonl") for x in read_jsonl(r["files"][f]))  # noqa
    assert pick(a) != pick(c)  # another seed, another mix


def test_token_limit_drops_and_counts(tmp_path, tok):
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "data.cleaning.max_tokens": 120})
    rep = prepare(cfg, tokenizer=tok)["report"]
    assert sum(rep["removed"]["too_long_tokens"].values()) > 0
    assert rep["token_stats"]["all"]["max"] <= 120


def test_table_source_by_yaml_only(tmp_path, tok):
    p = tmp_path / "faq.jsonl"
    p.write_text("\n".join(json.dumps({"ask": f"Question {i}?", "reply": f"Answer number {i}."}) for i in range(6)))
    cfg = load_config("smoke", {"output_dir": str(tmp_path / "o"), "data.sources": [
        {"name": "faq", "kind": "table", "path": str(p), "question_column": "ask", "answer_column": "reply"}]})
    res = prepare(cfg, tokenizer=tok)
    assert res["train"] + res["val"] == 6


def test_test_split_source_refused(tmp_path):
    cfg = load_config("smoke", {"output_dir": str(tmp_path), "data.sources": [{"name": "DR", "split": "test"}]})
    with pytest.raises(DataError, match="split 'test' cannot be trained on"):
        prepare(cfg)
    assert not (tmp_path / "data").exists()


def test_cli_data_stage(tmp_path):
    from phyassist.cli import main

    out = tmp_path / "run"
    assert main(["data", "--config", "smoke", "--output-dir", str(out), "--figure", str(tmp_path / "h.png")]) == 0
    assert (out / "config.resolved.yaml").exists() and (out / "versions.json").exists()
    assert (out / "data" / "train.jsonl").exists() and (tmp_path / "h.png").exists()
    assert main(["data", "--config", "smoke", "--output-dir", str(tmp_path / "bad"), "data.val_fraction=2"]) == 2
    assert not (tmp_path / "bad").exists()


# --- gen_csv ----------------------------------------------------------------------------------

def test_gen_csv_counsel_chat_chatml(tmp_path, capsys):
    out = tmp_path / "cc.csv"
    rc = gen_csv.main(["--origin_path", str(SAMPLE_DIR / "counsel-chat/20200325_counsel_chat.csv"),
                       "--new_path", str(out), "--model", "smollm2-135m-instruct", "--system-prompt", "Be kind."])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "removed: links" in printed and "removed: exact_duplicate" in printed
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["text"].startswith("<|im_start|>system\nBe kind.<|im_end|>")


BAD_INPUTS = {
    "missing_column": ("bad.csv", b"query,answer\nq,a\n", ["--source", "imhi"], r"missing column\(s\) \['gpt-3.5-turbo'\]"),
    "encoding": ("bad.csv", "question,answer\nq,caf\xe9\n".encode("latin-1"), [], r"line 2: not UTF-8"),
    "empty": ("bad.csv", b"", [], r"file is empty"),
    "malformed": ("bad.csv", b'question,answer\n"q","a","x"\n', [], r"line 2: expected 2 fields"),
    "malformed_json": ("bad.jsonl", b'{"question": "q", "answer": "a"}\n{"question": \n', [], r"line 2: not valid JSON"),
    "unknown_columns": ("bad.csv", b"foo,bar\n1,2\n", [], r"cannot tell which source"),
    "bad_config_value": ("ok.csv", b"question,answer\nq,a\n", ["--n-rows", "0"], r"data\.sources\.0\.n_rows"),
    "missing_file": (None, None, [], r"file not found \(--origin_path\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_gen_csv_bad_input(case, tmp_path, capsys):
    name, content, extra, pattern = BAD_INPUTS[case]
    src = tmp_path / (name or "absent.csv")
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.csv"
    assert gen_csv.main(["--origin_path", str(src), "--new_path", str(out), "--model", "tiny-mixtral", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(src.name) in err or case == "bad_config_value"
    import re

    assert re.search(pattern, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))


def test_gen_csv_unknown_source_flag(tmp_path):
    proc = subprocess.run([sys.executable, str(GEN_CSV), "--origin_path", "x.csv", "--new_path", str(tmp_path / "o.csv"),
                           "--source", "excel"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'excel'" in proc.stderr and not (tmp_path / "o.csv").exists()


# --- real data --------------------------------------------------------------------------------

def test_gen_csv_real_dr_mixtral(shared_data, tmp_path):
    """The issue's command: Mixtral-format text rows and the per-rule counts."""
    out = tmp_path / "dr.csv"
    proc = subprocess.run([sys.executable, str(GEN_CSV), "--origin_path",
                           str(shared_data / "MentalLLaMA/train_data/instruction_data/DR/train.csv"),
                           "--new_path", str(out)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "rows read" in proc.stdout and "removed: links" in proc.stdout
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 800
    assert all(r["text"].startswith('<s>[INST] Consider this post: "') and r["text"].endswith("</s>") for r in rows)
    assert all(" [/INST] Yes, the poster" in r["text"] or " [/INST] No, the poster" in r["text"] for r in rows)


def test_paper_mix_on_real_data(shared_data, tmp_path, tok):
    sources = [{"name": n, "n_rows": 40} for n in ("DR", "dreaddit", "Irf", "MultiWD", "SAD")]
    sources.append({"name": "counsel-chat", "kind": "counsel_chat", "n_rows": 60})
    cfg = load_config("paper", {"output_dir": str(tmp_path), "data.data_dir": str(shared_data),
                                "data.download": False, "data.sources": sources})
    res = prepare(cfg, tokenizer=tok)
    rep = res["report"]
    assert {s: v["sampled"] for s, v in rep["sources"].items()} == {**{n["name"]: 40 for n in sources[:5]},
                                                                    "counsel-chat": 60}
    assert rep["sources"]["Irf"]["split"] == "val" and rep["sources"]["DR"]["split"] == "train"
    assert rep["repaired"]["mojibake"]["MultiWD"] > 100  # MultiWD's val file is Mac-Roman mojibake
    assert rep["removed"]["test_overlap"]["MultiWD"] > 100 and rep["removed"]["links"]["counsel-chat"] > 50
    assert all(v["normalised_post"] == 0 for v in rep["leakage"]["train_vs_test"].values())


# --- the chat template the records were formatted for ------------------------------------------

def test_records_carry_their_template_and_another_model_is_refused(smoke, capsys):
    from phyassist.cli import main
    from phyassist.data.records import MANIFEST, check_run_records

    cfg, _ = smoke
    manifest = json.loads((cfg.out / "data" / MANIFEST).read_text())
    assert manifest["model"] == "smollm2-135m-instruct" and "<|im_start|>" in manifest["probe"]
    assert check_run_records(cfg) == manifest
    # tiny-mixtral keeps SmolLM2's tokenizer and its ChatML template: the same text, accepted
    assert check_run_records(load_config("smoke", {"output_dir": str(cfg.out), "model.name": "tiny-mixtral"}))
    swapped = load_config("smoke", {"output_dir": str(cfg.out), "model.chat_template": "mixtral"})
    with pytest.raises(DataError, match=r"formatted for model 'smollm2-135m-instruct'.*rerun the data stage"):
        check_run_records(swapped)
    # the train stage refuses before loading any model (exit 1, one line naming the fix)
    assert main(["train", "--config", "smoke", "--output-dir", str(cfg.out), "model.chat_template=mixtral",
                 "wandb.mode=disabled"]) == 1
    err = capsys.readouterr().err
    assert "rerun the data stage" in err and not (cfg.out / "checkpoints").exists()
    # evaluate and the app refuse them too, before loading a model
    import argparse

    from phyassist.app.stage import main as app_main
    from phyassist.evaluate.stage import run_evaluation

    with pytest.raises(DataError, match="rerun the data stage"):
        run_evaluation(swapped, progress=False)
    assert not (cfg.out / "eval").exists()
    with pytest.raises(DataError, match="rerun the data stage"):
        app_main(swapped, argparse.Namespace(data_dir=None, port=None, host=None))
