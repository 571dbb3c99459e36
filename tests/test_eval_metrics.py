"""Evaluation metrics: rule labels on every released gold answer, text metrics in English and
Chinese, BARTScore and the classifier on tiny random models, bad input."""

import glob
import json
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from phyassist.evaluate import labels, metrics
from phyassist.evaluate.labels import MODES, UNLABELLED, label_metrics, label_set, parse_gold, parse_label

REPO = Path(__file__).resolve().parent.parent


def _released_gold_files(root: Path) -> list[tuple[str, Path]]:
    ml = root / "MentalLLaMA"
    out = [(Path(f).stem, Path(f)) for f in glob.glob(str(ml / "test_data" / "*" / "*.csv"))]
    out += [(Path(f).parent.name, Path(f)) for f in glob.glob(str(ml / "train_data" / "instruction_data" / "*" / "*.csv"))]
    return sorted(out)


def test_every_released_gold_answer_scores_100_in_both_modes(shared_data):
    files = _released_gold_files(shared_data)
    assert {t for t, _ in files} >= {"CAMS", "DR", "Irf", "MultiWD", "SAD", "dreaddit", "loneliness", "t-sid"}
    for task, path in files:
        gold = pd.read_csv(path)["gpt-3.5-turbo"].astype(str).tolist()
        for mode in MODES:
            parsed = parse_gold(gold, task, mode)
            assert UNLABELLED not in parsed, (path, mode, gold[parsed.index(UNLABELLED)][:100])
            lab = label_set(gold, gold, task, mode)  # gold scored as predictions
            m = label_metrics(lab.gold, lab.pred, task)
            assert m["weighted_f1"] == 100.0 and m["accuracy"] == 100.0, (path, mode, m)
            assert lab.dropped_gold == 0 and len(lab.gold) == len(gold)
        # each distinct label sentence maps to one class and distinct sentences to distinct classes
        by_sentence = defaultdict(set)
        for g, p in zip(gold, parse_gold(gold, task, "robust")):
            by_sentence[g.split("Reasoning:")[0].strip()].add(p)
        assert all(len(v) == 1 for v in by_sentence.values()), path
        if "test_complete" not in path.parts:  # completion-style golds phrase one class several ways
            assert len({next(iter(v)) for v in by_sentence.values()}) == len(by_sentence), path
        assert parse_gold(gold, task, "official") == parse_gold(gold, task, "robust"), path


def test_complete_and_instruction_golds_agree(shared_data):
    base = shared_data / "MentalLLaMA" / "test_data"
    for f in sorted((base / "test_instruction").glob("*.csv")):
        for mode in MODES:
            a = parse_gold(pd.read_csv(f)["gpt-3.5-turbo"].astype(str).tolist(), f.stem, mode)
            b = parse_gold(pd.read_csv(base / "test_complete" / f.name)["gpt-3.5-turbo"].astype(str).tolist(),
                           f.stem, mode)
            assert a == b, (f.name, mode)


def test_gold_as_predictions_scores_100_through_score_records(shared_data):
    for task in ("SAD", "CAMS", "t-sid", "DR"):
        path = shared_data / "MentalLLaMA" / "test_data" / "test_instruction" / f"{task}.csv"
        gold = pd.read_csv(path)["gpt-3.5-turbo"].astype(str).tolist()[:40]
        recs = [{"prediction": g, "reference": g} for g in gold]
        out = metrics.score_records(recs, task=task)
        for mode in MODES:
            assert out[f"labels_{mode}"]["weighted_f1"] == 100.0
            assert out[f"labels_{mode}"]["ci"]["weighted_f1"] == [100.0, 100.0]
        assert out["rougeL"] == pytest.approx(100.0) and out["length_quality"] == 1.0 and out["lang"] == "en"


@pytest.mark.parametrize("text,task,label", [
    ("Yes, the poster suffers from depression. Reasoning: ...", "DR", "yes"),
    ("No, the post does not show this risk.", "Irf", "no"),
    ("The poster does not suffer from stress; the tone is calm.", "dreaddit", "no"),
    ("The poster suffers from loneliness.", "loneliness", "yes"),
    ("This post shows the stress cause related to emotion turmoil. Reasoning: work", "SAD", "emotional"),
    ("This post shows other stress causes. Reasoning: school is fine", "SAD", "other"),
    ("This post shows no causes of depression.", "CAMS", "none"),
    ("This post shows causes of depression related to jobs and career.", "CAMS", "job"),
    ("This post shows no mental disorders.", "t-sid", "control"),
    ("This post shows suicide or self-harm tendency.", "t-sid", "suicide"),
    ("I am a language model and cannot say.", "SAD", UNLABELLED),
    ("Hello there.", "DR", UNLABELLED),
])
def test_parse_label_examples(text, task, label):
    assert parse_label(text, task) == label


def test_label_metrics_count_unlabelled_as_wrong():
    gold = ["yes", "yes", "no", "no"]
    pred = ["yes", UNLABELLED, "no", "yes"]
    m = label_metrics(gold, pred, "DR")
    assert m["unlabelled"] == 1 and m["accuracy"] == 50.0 and m["micro_f1"] == 50.0
    from sklearn.metrics import f1_score

    assert m["weighted_f1"] == round(100 * f1_score(gold, pred, labels=["no", "yes"], average="weighted"), 2)
    assert m["macro_f1"] == round(100 * f1_score(gold, pred, labels=["no", "yes"], average="macro"), 2)


def test_unknown_task_and_length_mismatch_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'XYZ'.*DR"):
        labels.get_task("XYZ")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.rouge([], [])


def test_english_text_metrics_known_values():
    refs = ["the cat sat on the mat today", "a quick brown fox jumps"]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    r = metrics.rouge(["the cat sat", "nothing shared"], refs)
    # rouge1 of pair 1: P=3/3, R=3/7 -> F=0.6; pair 2: 0 -> mean 30
    assert r["rouge1"] == pytest.approx(30.0, abs=1e-3)
    assert metrics.length_quality(["one two", "a b c d e"], ["one two three four", "a b c d e"]) == 0.75
    assert metrics.mean_length(["one two", "a b c d"]) == 3.0


def test_chinese_text_metrics_are_not_zero():
    pred = ["我今天很难过，因为考试失败了。"]
    ref = ["我今天很难过，考试没有通过。"]
    r = metrics.rouge(pred, ref, lang="zh")
    # characters without punctuation: pred 13, ref 12, LCS/overlap 9 ("我今天很难过考试了" vs ...)
    assert 50 < r["rouge1"] < 90 and r["rougeL"] > 0
    assert metrics.rouge(ref, ref, lang="zh")["rouge2"] == pytest.approx(100.0)
    assert metrics.rouge(pred, ref, lang="zh", zh_tokenizer="jieba")["rouge1"] > 0
    assert metrics.bleu(ref, ref, lang="zh") == pytest.approx(100.0)
    assert 0 < metrics.bleu(pred, ref, lang="zh") < 100
    assert metrics.mean_length(["你好世界"], "zh") == 4.0
    assert metrics.length_quality(["你好"], ["你好世界"], "zh") == 0.5
    assert metrics.detect_lang(ref) == "zh" and metrics.detect_lang(["hello"]) == "en"


def test_embedding_cosine_offline_minilm():
    same = metrics.embedding_cosine(["I feel very sad and alone."], ["I feel very sad and alone."])
    diff = metrics.embedding_cosine(["I feel very sad and alone."], ["The stock market rose today."])
    assert same == pytest.approx(1.0, abs=1e-3) and diff < 0.5


def test_bartscore_matches_independent_mean_token_loglik():
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from phyassist.evaluate.bartscore import BARTScorer, bart_score
    from phyassist.evaluate.tiny import tiny_bart_path

    srcs = ["the poster is sad", "work stress", "a much longer generated text about feelings"]
    tgts = ["Yes, the poster suffers from depression.", "This post shows stress at work.", "no"]
    scorer = BARTScorer("tiny-bart")
    got = scorer.score(srcs, tgts, batch_size=2)
    tok = AutoTokenizer.from_pretrained(tiny_bart_path())
    model = BartForConditionalGeneration.from_pretrained(tiny_bart_path()).eval()
    for s, t, g in zip(srcs, tgts, got):  # one pair at a time: no padding; HF's loss = mean token NLL
        enc, lab = tok(s, return_tensors="pt"), tok(t, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(**enc, labels=lab).loss.item()
        assert g == pytest.approx(-loss, abs=1e-4)
    assert bart_score(srcs, tgts, "tiny-bart", scorer=scorer) == pytest.approx(sum(got) / 3, abs=1e-4)
    with pytest.raises(ValueError, match="predictions"):
        bart_score(srcs, tgts[:2], scorer=scorer)


def test_classifier_argmax_names_task_classes():
    from phyassist.evaluate.classifier import classify
    from phyassist.evaluate.tiny import resolve_classifier

    path = resolve_classifier("tiny-mentalbert", "SAD")
    out = classify(["work is hard", "my family", "school exams"], "SAD", path, batch_size=2)
    assert len(out) == 3 and set(out) <= set(labels.TASKS["SAD"].classes)
    with pytest.raises(ValueError, match="9 outputs but DR has 2"):
        classify(["x"], "DR", path)
    assert resolve_classifier("Tianlin668", "DR") == "Tianlin668/DR"


def _cli(capsys, *args):
    """``python -m phyassist ...`` in-process (the CLI's own error handling and exit codes)."""
    from types import SimpleNamespace

    from phyassist.cli import main

    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err
    return SimpleNamespace(returncode=code, stderr=err)


def test_score_cli_writes_scores_and_rejects_bad_input(tmp_path, capsys):
    good = tmp_path / "preds.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prediction": "Yes, the poster suffers from depression. Reasoning: sad.",
         "reference": "Yes, the poster suffers from depression. Reasoning: the post is sad."},
        {"prediction": "Yes.", "reference": "No, the poster does not suffer from depression. Reasoning: calm."},
    ]) + "\n")
    out = tmp_path / "scores.json"
    r = _cli(capsys, "score", "--input", str(good), "--output", str(out), "--task", "DR",
             "--bartscore-model", "tiny-bart", "--classifier", "tiny-mentalbert")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    # "Yes." vs a "No" gold: wrong in both modes
    assert s["labels_official"]["accuracy"] == 50.0 and s["labels_robust"]["n"] == 2
    assert "labels" not in s["labels_official"] and s["labels_official"]["confusion"]["labels"] == ["no", "yes"]
    assert {"bleu", "rouge1", "rougeL", "cosine", "length_quality", "bartscore", "labels_classifier"} <= set(s)
    assert math.isfinite(s["bartscore"])

    cases = {
        "empty.jsonl": ("", "empty file"),
        "nofield.jsonl": (json.dumps({"prediction": "x"}) + "\n", "record 1 has no field 'reference'"),
        "cols.csv": ("a,b\n1,2\n", "missing column"),
    }
    for name, (text, msg) in cases.items():
        bad, dst = tmp_path / name, tmp_path / f"{name}.scores.json"
        bad.write_text(text)
        r = _cli(capsys, "score", "--input", str(bad), "--output", str(dst))
        assert r.returncode != 0 and msg in r.stderr and str(bad) in r.stderr, r.stderr
        assert not dst.exists()
    r = _cli(capsys, "score", "--input", str(good), "--output", str(tmp_path / "x.json"), "--task", "NOPE")
    assert r.returncode != 0 and "unknown task 'NOPE'" in r.stderr and not (tmp_path / "x.json").exists()
