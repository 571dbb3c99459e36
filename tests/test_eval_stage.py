"""The evaluate stage end to end on the bundled sample (smoke profile), resumable generation,
bad test files, and notebook 03."""

import json
from pathlib import Path

import pandas as pd
import pytest

from phyassist.config import load_config
from phyassist.evaluate import generate as gen
from phyassist.evaluate.testsets import read_test_csv
from phyassist.paths import NOTEBOOKS_DIR

FAST = ["evaluate.max_examples=2", "evaluate.max_new_tokens=6", "evaluate.sets=[DR,SAD]"]


def test_evaluate_cli_smoke_writes_f1_and_bartscore(tmp_path):
    from phyassist.cli import main

    out = tmp_path / "run"
    assert main(["evaluate", "--config", "smoke", "--output-dir", str(out), "--no-progress", *FAST]) == 0
    df = pd.read_csv(out / "eval" / "comparison.csv")
    assert set(df["system"]) == {"base", "majority"} and set(df["set"]) == {"DR", "SAD"}
    for mode in ("official", "robust"):
        assert df[[f"{mode}_weighted_f1", f"{mode}_weighted_f1_lo", f"{mode}_accuracy_hi"]].notna().all().all()
    assert df["bartscore"].notna().all() and df["clf_weighted_f1"].notna().all()
    for name in ("base_DR_official.json", "base_SAD_robust.csv", "majority_DR_robust.json"):
        assert (out / "eval" / "confusion" / name).exists(), name
    assert (out / "eval" / "confusion_official.png").stat().st_size > 1000
    for s in ("DR", "SAD"):
        o = pd.read_csv(out / "eval" / "base" / f"{s}.csv")
        assert list(o.columns) == ["goldens", "generated_text"] and len(o) == 2
        assert not (out / "eval" / "base" / f"{s}.partial.jsonl").exists()
    md = (out / "eval" / "comparison.md").read_text()
    assert md.startswith("| set | system") and "BARTScore: tiny-bart without the ParaBank2 weights" in md
    assert md.index("official_weighted_f1") < md.index("robust_weighted_f1")
    assert (out / "eval" / "comparison.png").stat().st_size > 1000


class _FakeModel:
    """Counts prompts it is asked to answer; dies after ``die_after`` batches."""

    def __init__(self, die_after=None):
        import torch

        self.calls, self.die_after, self.p = 0, die_after, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.p

    def generate(self, input_ids, attention_mask, **kw):
        import torch

        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        new = torch.full((input_ids.shape[0], 2), 42, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)


def test_killed_generation_resumes_without_regenerating(tmp_path):
    from phyassist.models.loading import load_tokenizer

    cfg = load_config("smoke")
    tok = load_tokenizer(cfg.model, padding_side="left")
    queries = [f"post number {i}: I feel {'very ' * i}tired" for i in range(6)]
    goldens = [f"gold {i}" for i in range(6)]
    csv = tmp_path / "eval" / "base" / "DR.csv"
    with pytest.raises(KeyboardInterrupt):
        gen.generate_set(_FakeModel(die_after=2), tok, queries, goldens, csv, max_new_tokens=2,
                         batch_size=2, chunk_batches=1, progress=False)
    partial = csv.with_name("DR.partial.jsonl")
    assert not csv.exists() and len(partial.read_text().splitlines()) == 4
    m = _FakeModel()
    out = gen.generate_set(m, tok, queries, goldens, csv, max_new_tokens=2, batch_size=2, chunk_batches=1,
                           progress=False)
    assert m.calls == 1 and len(out) == 6 and csv.exists() and not partial.exists()
    m2 = _FakeModel()  # a complete CSV is reused as is
    assert gen.generate_set(m2, tok, queries, goldens, csv, progress=False) == out and m2.calls == 0


def test_batched_generation_matches_one_by_one_greedy():
    from phyassist.models.loading import load_model, load_tokenizer

    cfg = load_config("smoke", ["model.name=tiny-mixtral", "model.quant.load_in_4bit=false"])
    tok, model = load_tokenizer(cfg.model, "left"), load_model(cfg.model).eval()
    prompts = gen.chat_prompts(tok, ["short", "a much longer question about sleep and stress"])
    batched = gen.generate_batched(model, tok, prompts, max_new_tokens=5, batch_size=2, progress=False)
    single = [gen.generate_batched(model, tok, [p], max_new_tokens=5, batch_size=1, progress=False)[0]
              for p in prompts]
    assert batched == single


@pytest.mark.parametrize("text,msg", [
    ("", "empty file"),
    ("query,answer\nq,a\n", "missing column(s) ['gpt-3.5-turbo']"),
    ("query,gpt-3.5-turbo\n", "no rows"),
    ("query,gpt-3.5-turbo\nq,\n", "empty 'gpt-3.5-turbo' at row(s) [2]"),
])
def test_bad_test_file_names_file_and_field(tmp_path, text, msg):
    p = tmp_path / "DR.csv"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        read_test_csv(p)
    assert msg in str(e.value) and str(p) in str(e.value)


def test_bad_test_set_fails_before_any_output(tmp_path):
    from phyassist.evaluate.stage import run_evaluation

    bad = tmp_path / "tests"
    bad.mkdir()
    (bad / "DR.csv").write_text("query\nq\n")
    cfg = load_config("smoke", [f"output_dir={tmp_path / 'run'}", f"evaluate.test_dir={bad}", "evaluate.sets=[DR]"])
    with pytest.raises(ValueError, match="DR.csv: missing column"):
        run_evaluation(cfg)
    assert not (tmp_path / "run" / "eval").exists()


def _write_outputs(run, tag, name, goldens, answers):
    d = run / "eval" / tag
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"goldens": goldens, "generated_text": answers}).to_csv(d / f"{name}.csv", index=False)


def test_sets_by_yaml_score_without_code(tmp_path):
    """A student's set: own file, columns and classes -> label metrics in both modes, paired tests;
    a set without classes -> text metrics and a notice; errors name the key, file and row."""
    from phyassist.evaluate.stage import score_and_tabulate
    from phyassist.evaluate.testsets import load_test_sets

    data = tmp_path / "mood.jsonl"
    gold = ["Mood: happy. Why: smiles."] * 6 + ["Mood: sad. Why: tears."] * 4
    data.write_text("".join(json.dumps({"post": f"p{i}", "answer": g}) + "\n" for i, g in enumerate(gold)))
    free = tmp_path / "free.csv"
    pd.DataFrame({"q": ["a", "b"], "a": ["some reply", "another reply"]}).to_csv(free, index=False)
    spec = ('[{name: mood, file: %s, query: post, gold: answer, classes: {happy: ["\\\\bhappy"], '
            'sad: ["\\\\bsad"]}, default_class: happy}, {name: free, file: %s, query: q, gold: a}]' % (data, free))
    cfg = load_config("smoke", [f"output_dir={tmp_path / 'run'}", f"evaluate.sets={spec}",
                                "evaluate.bartscore_model=null", "evaluate.classifiers=null", "evaluate.cosine=false",
                                "evaluate.bootstrap_resamples=200", "evaluate.max_examples=null"])
    sets = load_test_sets(cfg)
    assert [s.name for s in sets] == ["mood", "free"] and sets[1].task is None
    run = tmp_path / "run"
    _write_outputs(run, "base", "mood", gold, ["Mood: sad."] * 10)
    _write_outputs(run, "finetuned", "mood", gold, gold)
    for tag in ("base", "finetuned"):
        _write_outputs(run, tag, "free", sets[1].goldens, ["reply", "x"])
    res = score_and_tabulate(cfg, sets, ["finetuned", "base"])
    rows = {(r["set"], r["system"]): r for r in res["rows"]}
    ft = rows[("mood", "finetuned")]
    assert ft["official_weighted_f1"] == 100.0 and ft["robust_weighted_f1"] == 100.0
    assert ft["official_p_vs_base"] < 0.05 and "official_p_vs_majority" in ft
    assert rows[("mood", "base")]["official_accuracy"] == 40.0 and ("mood", "majority") in rows
    assert "official_accuracy" not in rows[("free", "base")] and "label metrics skipped" in res["notices"]["free"]
    assert rows[("free", "base")]["bleu"] >= 0 and ("free", "majority") not in rows
    from phyassist.evaluate.results import headline_table
    from phyassist.publish.report import read_scores  # the model card reads the official F1

    readme = headline_table(res["rows"])
    assert "| mood (10) | 45.00 | 22.86 [" in readme and "**100.00 [100.00, 100.00]**" in readme, readme
    assert "| free (2) | n/a | n/a | n/a |" in readme

    assert [(s.set, s.value) for s in read_scores(res["table_csv"]) if s.metric == "weighted_f1"] == [("mood", 100.0)]

    bad = tmp_path / "bad.csv"
    pd.DataFrame({"post": ["x", ""], "answer": ["a", "b"]}).to_csv(bad, index=False)
    cfg = load_config("smoke", [f"evaluate.sets=[{{name: b, file: {bad}, query: post, gold: answer}}]"])
    with pytest.raises(ValueError, match=r"bad.csv: empty 'post' at row\(s\) \[3\]"):
        load_test_sets(cfg)
    cfg = load_config("smoke", [f"evaluate.sets=[{{name: b, file: {bad}}}]"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['query', 'gpt-3.5-turbo'\].*query:/gold:"):
        load_test_sets(cfg)
    with pytest.raises(Exception, match="pattern '\\(' is not a regex"):
        load_config("smoke", ['evaluate.sets=[{name: b, file: x.csv, classes: {a: ["("]}}]'])


def test_mixed_language_set_is_a_clear_error(tmp_path):
    from phyassist.evaluate.metrics import resolve_lang

    assert resolve_lang(["我今天很难过。", "考试没有通过。"]) == "zh"
    assert resolve_lang(["I am sad.", "Exams went badly."]) == "en"
    with pytest.raises(ValueError, match="mixed languages \\(50 % of texts Chinese"):
        resolve_lang(["我今天很难过。", "I am sad."], what="DR.csv")
    with pytest.raises(ValueError, match="no letters"):
        resolve_lang(["...", "!!"])


def test_notebook_03_runs_on_smoke(tmp_path):
    from phyassist.pipeline import execute_notebook

    over = dict(o.split("=", 1) for o in FAST)
    over["evaluate.sets"] = ["DR"]
    over["evaluate.max_examples"] = 1
    out = execute_notebook(NOTEBOOKS_DIR / "03_evaluate.ipynb", tmp_path / "nb",
                           {"config": "smoke", "overrides": over, "output_dir": str(tmp_path / "run")})
    nb = json.loads(Path(out).read_text())
    outputs = [json.dumps(c.get("outputs", [])) for c in nb["cells"] if c["cell_type"] == "code"]
    text = "\n".join(outputs)
    assert "official_weighted_f1" in text and "robust_weighted_f1" in text
    assert "DR: base weighted F1" in text and "vs majority" in text  # the interpretation
    assert "image/png" in text and "predicted" in text              # plots and labelled examples
    for noise in ("Loading weights", "FutureWarning", "it/s]"):    # clean cell output
        assert noise not in text, noise
    assert (tmp_path / "run" / "eval" / "comparison.csv").exists()


def test_answers_export_and_rescore_cli(tmp_path, capsys):
    """Answers without query/gold text, rescored by the CLI against a copy of the test sets; a test file
    whose query changed is an error naming the set and row."""
    import gzip

    from phyassist.cli import main
    from phyassist.evaluate.answers import export_answers
    from phyassist.evaluate.testsets import load_test_sets

    tests = tmp_path / "tests"
    tests.mkdir()
    gold = ["Yes, the poster suffers from depression. Reasoning: sad."] * 3 + \
           ["No, the poster does not suffer from depression. Reasoning: calm."] * 2
    queries = [f"Consider this post: secret post {i} Question: depressed?" for i in range(5)]
    pd.DataFrame({"query": queries, "gpt-3.5-turbo": gold}).to_csv(tests / "DR.csv", index=False)
    over = [f"evaluate.test_dir={tests}", "evaluate.sets=[DR]", "evaluate.max_examples=null",
            "evaluate.bartscore_model=null", "evaluate.classifiers=null", "evaluate.cosine=false",
            "evaluate.bootstrap_resamples=100"]
    cfg = load_config("smoke", [f"output_dir={tmp_path / 'gpu'}"] + over)
    sets = load_test_sets(cfg)
    _write_outputs(tmp_path / "gpu", "base", "DR", gold, ["Yes."] * 5)
    _write_outputs(tmp_path / "gpu", "finetuned", "DR", gold, gold)
    files = export_answers(tmp_path / "gpu" / "eval", sets, ["base", "finetuned"], tmp_path / "answers")
    raw = gzip.decompress(files[0].read_bytes()).decode()
    assert "secret post" not in raw and "Reasoning: sad" not in raw and raw.count("\n") == 5
    assert export_answers(tmp_path / "gpu" / "eval", sets, ["base"], tmp_path / "again")[0].read_bytes() == \
        files[0].read_bytes()  # deterministic bytes

    out = tmp_path / "rescore"
    assert main(["score", "--config", "smoke", "-o", str(out), *over, "--answers", *map(str, files)]) == 0
    df = pd.read_csv(out / "eval" / "comparison.csv").set_index("system")
    assert df.loc["finetuned", "official_weighted_f1"] == 100.0 and df.loc["base", "official_accuracy"] == 60.0
    assert df.loc["finetuned", "official_p_vs_base"] < 0.2 and "majority" in df.index

    pd.DataFrame({"query": queries[:4] + ["another post"], "gpt-3.5-turbo": gold}).to_csv(tests / "DR.csv", index=False)
    capsys.readouterr()
    assert main(["score", "--config", "smoke", "-o", str(out), *over, "--answers", str(files[0])]) == 1
    assert "set DR: row(s) [4] answer another query" in capsys.readouterr().err
