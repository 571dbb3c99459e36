"""Label modes and label statistics.

The official mode is checked against expectations derived by hand from MentalLLaMA's rules
(``src/IMHI.py`` ``calculate_f1`` for generated text, ``src/label_inference.py`` for gold), one
case per rule: the case-sensitive "Reasoning:" split, substring matching ("no" inside "know"),
the order of the phrases, each set's default class and its phrase list. The robust mode is
checked on the released gold reshaped (preambled, truncated, reasoning-first) and on paraphrases.
"""

import gzip
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from phyassist.evaluate import labels as L
from phyassist.evaluate.labels import OFFICIAL, ROBUST, UNLABELLED, label_metrics, label_set
from phyassist.evaluate.stats import bootstrap_ci, confusion, f1_scores, paired_bootstrap

# (text, set, official label, official defaulted?, robust label, why) -- derived by hand from IMHI.py
RULES = [
    # the label part ends at the first case-SENSITIVE "Reasoning:"; lower case does not split
    ("No. reasoning: yes, the poster is sad", "DR", "yes", False, "no", "lower-case reasoning: no split"),
    ("No. Reasoning: yes, the poster is sad", "DR", "no", False, "no", "split at Reasoning:"),
    # "yes" is tested before "no", both as substrings
    ("No; although he says yes to friends, the poster does not suffer.", "DR", "yes", False, "no", "yes first"),
    ("The poster's eyes look tired.", "DR", "yes", False, UNLABELLED, '"yes" inside "eyes"'),
    ("I cannot tell.", "dreaddit", "no", False, UNLABELLED, '"no" inside "cannot"'),
    ("I don't know.", "Irf", "no", False, UNLABELLED, '"no" inside "know"'),
    # nothing found: the set's default class (IMHI.py appends 0 / 8 and counts it "OOD")
    ("Hello.", "DR", "no", True, UNLABELLED, "binary default no"),
    ("The poster shows signs of depression.", "DR", "no", True, "yes", "an assertion without yes"),
    ("The poster hardly suffers from stress.", "dreaddit", "no", True, "no", "negation without no"),
    ("I am a language model.", "SAD", "other", True, UNLABELLED, "SAD default other"),
    ("I am a language model.", "CAMS", "none", True, UNLABELLED, "CAMS default none"),
    ("I am a language model.", "t-sid", "control", True, UNLABELLED, "t-sid default control"),
    ("I am a language model.", "swmh", "no mental", True, UNLABELLED, "swmh default no mental"),
    # SAD: order school, financial, family, social, work, health, emotional, decision, other
    ("The stress is about work, not school.", "SAD", "school", False, "work", "order; negated mention"),
    ("Stress about homework.", "SAD", "work", False, "school", '"work" inside "homework"'),
    ("The poster argues with her mother.", "SAD", "other", False, "family", '"other" inside "mother"'),
    ("The poster is worried about finances.", "SAD", "other", True, "financial", "inflection"),
    ("This post shows stress from everyday life.", "SAD", "other", True, "everyday", "IMHI.py reads 'decision'"),
    ("This post shows stress from everyday decision making.", "SAD", "everyday", False, "everyday", "decision"),
    ("This post shows the stress cause related to emotion turmoil.", "SAD", "emotional", False, "emotional",
     "the kit's gold fix (IMHI.py alone: other)"),
    # CAMS: none, bias, jobs, medication, relationship, alienation
    ("Related to job loss.", "CAMS", "none", True, "job", "IMHI.py reads 'jobs'"),
    ("Poor relations with others.", "CAMS", "none", True, "relation", "IMHI.py reads 'relationship'"),
    ("This post shows no causes of depression.", "CAMS", "none", True, "none", "default (fix: not defaulted)"),
    # t-sid: depression, suicide, ptsd, no mental
    ("Suicidal thoughts following depression.", "t-sid", "depression", False, "suicide", "order; suicidal"),
    ("This post shows PTSD.", "t-sid", "ptsd", False, "ptsd", "lower-cased"),
    # swmh: no mental first
    ("No mental disorder, though anxiety is mentioned.", "swmh", "no mental", False, "no mental", "order"),
]


@pytest.mark.parametrize("text,task,official,defaulted,robust,why", RULES, ids=[r[5] for r in RULES])
def test_official_and_robust_rules_by_hand(text, task, official, defaulted, robust, why):
    fix = not (task == "CAMS" and "no causes" in text)
    got, d = L.parse_official(text, task)
    assert got == official, why
    if fix:
        assert d == defaulted, why
    assert L.parse_robust(text, task) == robust, why


def test_gold_fix_is_the_only_addition_to_imhi_py():
    text = "This post shows the stress cause related to emotion turmoil."
    assert L.parse_official(text, "SAD", gold_fix=False) == ("other", True)  # IMHI.py alone
    assert L.parse_official("This post shows no causes of depression.", "CAMS", gold_fix=False) == ("none", True)
    assert L.parse_official("This post shows no causes of depression.", "CAMS") == ("none", False)
    rules = [(p.pattern, c) for p, c in L.TASKS["SAD"].official_rules(gold=False)]
    bare = [(p.pattern, c) for p, c in L.TASKS["SAD"].official_rules(gold=False, fix=False)]
    assert [r for r in rules if r not in bare] == [("emotion\\ turmoil", "emotional")]
    assert rules.index(("emotion\\ turmoil", "emotional")) == rules.index(("emotional", "emotional")) + 1


@pytest.mark.parametrize("text,task,label", [
    # label_inference.py's gold phrases (they differ from IMHI.py's answer phrases)
    ("This post shows the stress cause related to financial problem. Reasoning: ...", "SAD", "financial"),
    ("This post shows other stress causes. Reasoning: school", "SAD", "other"),
    ("This post shows the stress cause related to everyday decision making.", "SAD", "everyday"),
    ("This post shows causes of depression related to jobs and career.", "CAMS", "job"),
    ("This post shows no causes of depression.", "CAMS", "none"),
    ("This post shows suicide or self-harm tendency.", "t-sid", "suicide"),
    ("This post shows no mental disorders.", "t-sid", "control"),
    ("No, this wellness dimension does not exist in the post.", "MultiWD", "no"),
])
def test_official_gold_phrases(text, task, label):
    assert L.parse_official_gold(text, task) == label


def _gold(shared_data, task):
    path = shared_data / "MentalLLaMA" / "test_data" / "test_instruction" / f"{task}.csv"
    return pd.read_csv(path)["gpt-3.5-turbo"].astype(str).tolist()


def _score(gold, preds, task, mode):
    lab = label_set(gold, preds, task, mode)
    return label_metrics(lab.gold, lab.pred, task, lab.unlabelled)


def test_imhi_py_alone_misreads_the_released_sad_gold(shared_data):
    """IMHI.py's answer rules on the SAD gold: "emotion turmoil" gets the default class (the 87 the
    issue reports); with the kit's documented fix, 100."""
    gold = _gold(shared_data, "SAD")
    bare = [L.parse_official(g, "SAD", gold_fix=False)[0] for g in gold]
    m = label_metrics(L.parse_gold(gold, "SAD", OFFICIAL), bare, "SAD")
    assert m["weighted_f1"] == pytest.approx(86.99) and sum(b == "other" for b in bare) == 76 + 66
    assert _score(gold, gold, "SAD", OFFICIAL)["weighted_f1"] == 100.0


PREAMBLE = ("I read the post with care, looking at its wording, its context and the feelings that the writer "
            "puts into it, as well as at the typical signals that a clinician would look for in a piece of "
            "writing like this one, and here is my assessment of the question that was asked about the text. ")


@pytest.mark.parametrize("task", ["DR", "dreaddit", "Irf", "MultiWD", "SAD", "CAMS", "t-sid", "loneliness"])
def test_reshaped_gold_answers(shared_data, task):
    gold = _gold(shared_data, task)
    assert len(PREAMBLE) > 260
    heads = [g.split("Reasoning:")[0].strip() for g in gold]
    reasons = [g.split("Reasoning:", 1)[1].strip() for g in gold]
    preambled = [PREAMBLE + g for g in gold]
    truncated = [h + " Reasoning: The po" for h in heads]
    reasoning_first = [f"Reasoning: {r} Therefore: {h}" for h, r in zip(heads, reasons)]
    for preds in (preambled, truncated):
        for mode in (OFFICIAL, ROBUST):
            assert _score(gold, preds, task, mode)["weighted_f1"] == 100.0, mode
    assert _score(gold, reasoning_first, task, ROBUST)["weighted_f1"] == 100.0
    # IMHI.py reads only before "Reasoning:": nothing there, every answer gets the default class
    assert _score(gold, reasoning_first, task, OFFICIAL)["unlabelled"] == len(gold)


def test_a_preamble_that_uses_a_class_word_does_not_decide_robust(shared_data):
    gold = _gold(shared_data, "SAD")
    preds = ["Judging by the emotional tone of the writing: " + g for g in gold]
    assert _score(gold, preds, "SAD", ROBUST)["weighted_f1"] == 100.0
    assert _score(gold, preds, "SAD", OFFICIAL)["weighted_f1"] < 100.0  # order: 'emotional' beats later ones


@pytest.mark.parametrize("text,task,label", [
    ("Based on the post, the poster does suffer from depression.", "DR", "yes"),
    ("The poster is unlikely to be suffering from stress.", "dreaddit", "no"),
    ("There is no evidence that this dimension exists in the post.", "MultiWD", "no"),
    ("The post displays a risk of perceived burdensomeness.", "Irf", "yes"),
    ("The writer seems to be struggling with loneliness.", "loneliness", "yes"),
    ("The writer isn't lonely at all.", "loneliness", "no"),
    ("The main stressor is the poster's job.", "SAD", "work"),
    ("Most likely the stress comes from family conflict.", "SAD", "family"),
    ("The cause is related to academic pressure.", "SAD", "school"),
    ("The post points to depressive symptoms.", "t-sid", "depression"),
    ("The poster mentions self-harm.", "t-sid", "suicide"),
    ("The cause appears to be medications.", "CAMS", "medication"),
])
def test_robust_reads_paraphrases(text, task, label):
    assert L.parse_robust(text, task) == label


def test_sets_defined_by_classes():
    t = L.task_from_spec("sentiment", {"positive": [r"\bpositive\b", r"\bhappy\b"],
                                       "negative": [r"\bnegative\b", r"\bsad\b"]}, default="negative")
    assert L.parse_robust("Overall the tone is happy.", t) == "positive"
    assert L.parse_robust("Not positive, rather sad.", t) == "negative"
    assert L.parse_official("Not positive, rather sad.", t) == ("positive", False)  # listed order
    assert L.parse_official("unclear", t) == ("negative", True)
    with pytest.raises(ValueError, match="class 'x': pattern '\\(' is not a regex"):
        L.task_from_spec("s", {"x": ["("]})
    with pytest.raises(ValueError, match="default class 'maybe'"):
        L.task_from_spec("s", {"x": ["x"]}, default="maybe")
    with pytest.raises(ValueError, match="unknown label mode 'strict'"):
        L.parse_label("x", "DR", "strict")


# ------------------------------------------------------------------------------------------- stats

def test_f1_scores_equal_scikit_learn_on_random_labels():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    classes = ["a", "b", "c", "d"]
    for trial in range(30):
        n = rng.randint(1, 60)
        gold = [rng.choice(classes[:3]) for _ in range(n)]
        pred = [rng.choice(classes) for _ in range(n)]
        got = f1_scores(gold, pred, classes)
        assert got["accuracy"] == pytest.approx(100 * accuracy_score(gold, pred))
        for avg in ("weighted", "micro", "macro"):  # IMHI.py's call: sklearn's default labels
            assert got[f"{avg}_f1"] == pytest.approx(100 * f1_score(gold, pred, average=avg, zero_division=0))


def test_unlabelled_costs_recall_but_is_no_class():
    from sklearn.metrics import f1_score

    gold, pred = ["yes", "yes", "no", "no"], ["yes", UNLABELLED, "no", "no"]
    got = f1_scores(gold, pred, ["no", "yes"])
    assert got["accuracy"] == 75.0 and got["micro_f1"] == 75.0
    assert got["weighted_f1"] == pytest.approx(100 * f1_score(gold, pred, labels=["no", "yes"], average="weighted"))
    assert confusion(gold, pred, ["no", "yes"]) == {"labels": ["no", "yes", UNLABELLED],
                                                    "matrix": [[2, 0, 0], [0, 1, 1], [0, 0, 0]]}


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
    rng = random.Random(1)
    gold = [rng.choice(["no", "yes"]) for _ in range(400)]
    pred = [g if rng.random() < 0.7 else ("no" if g == "yes" else "yes") for g in gold]
    a = bootstrap_ci(gold, pred, ["no", "yes"], seed=3)
    assert a == bootstrap_ci(gold, pred, ["no", "yes"], seed=3) != bootstrap_ci(gold, pred, ["no", "yes"], seed=4)
    point = f1_scores(gold, pred, ["no", "yes"])
    for m in ("weighted_f1", "accuracy"):
        lo, hi = a[m]
        assert lo < point[m] < hi and 4 < hi - lo < 15  # ~ ±1.96·sqrt(.21/400)·100 = ±4.5
    small = bootstrap_ci(gold[:40], pred[:40], ["no", "yes"], seed=3)
    assert small["accuracy"][1] - small["accuracy"][0] > hi - lo


def test_paired_bootstrap_p_values():
    rng = random.Random(2)
    gold = [rng.choice(["no", "yes"]) for _ in range(300)]
    good = [g if rng.random() < 0.9 else "no" for g in gold]
    weak = [g if rng.random() < 0.55 else "no" for g in gold]
    better = paired_bootstrap(gold, weak, good, ["no", "yes"])
    assert better["p"] < 0.01 and better["difference"] > 0 and better["ci"][0] > 0
    assert paired_bootstrap(gold, good, weak, ["no", "yes"])["p"] > 0.99
    assert paired_bootstrap(gold, good, good, ["no", "yes"])["p"] == 1.0  # never better than itself
    with pytest.raises(ValueError, match="300 gold, 300 and 2"):
        paired_bootstrap(gold, good, good[:2], ["no", "yes"])


# ------------------------------------------- an independent re-implementation of IMHI.py's rules
#
# Written from reading MentalLLaMA's src/IMHI.py (commit 8472866, ``calculate_f1``), kept apart from
# phyassist.evaluate.labels on purpose: a table per set of (phrase, class) in the order IMHI.py tests
# them, substring tests on the lower-cased text before the first case-sensitive "Reasoning:", and
# the class IMHI.py appends when nothing matched. The kit's official mode must give the same class
# on every answer (the kit names classes as MentalLLaMA's label_inference.py does).

_BINARY = ([("yes", "yes"), ("no", "no")], "no")
IMHI_PY_ANSWER_RULES = {
    **{s: _BINARY for s in ("DR", "dreaddit", "Irf", "MultiWD", "loneliness", "CLP")},
    "SAD": ([("school", "school"), ("financial", "financial"), ("family", "family"), ("social", "social"),
             ("work", "work"), ("health", "health"), ("emotional", "emotional"), ("decision", "everyday"),
             ("other", "other")], "other"),
    "CAMS": ([("none", "none"), ("bias", "bias"), ("jobs", "job"), ("medication", "medication"),
              ("relationship", "relation"), ("alienation", "alienation")], "none"),
    "t-sid": ([("depression", "depression"), ("suicide", "suicide"), ("ptsd", "ptsd"),
               ("no mental", "control")], "control"),
    "swmh": ([("no mental", "no mental"), ("suicide", "suicide"), ("depression", "depression"),
              ("anxiety", "anxiety"), ("bipolar", "bipolar")], "no mental"),
}


def imhi_py_answer_label(output, task):
    """(class, counted as OOD) exactly as IMHI.py labels one generated answer."""
    part = str(output).split("Reasoning:")[0].lower()
    rules, default = IMHI_PY_ANSWER_RULES[task]
    for phrase, cls in rules:
        if phrase in part:
            return cls, False
    return default, True


REAL_ANSWERS = sorted((Path(__file__).resolve().parents[1] / "bench" / "real_eval").glob("answers_*.jsonl.gz"))


def _answers(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_official_mode_equals_imhi_py_on_every_released_gold_answer(shared_data):
    """On the released gold read as if generated: the same class as IMHI.py on every answer of every
    set; the kit's documented gold fix changes the class of the SAD "emotion turmoil" answers only, and
    stops counting CAMS "no causes" answers as OOD (their class stays "none")."""
    fixed = 0
    for task in ("DR", "dreaddit", "Irf", "MultiWD", "SAD", "CAMS", "t-sid", "loneliness"):
        for g in _gold(shared_data, task):
            assert L.parse_official(g, task, gold_fix=False) == imhi_py_answer_label(g, task), (task, g[:120])
            head = g.split("Reasoning:")[0].lower()
            if L.parse_official(g, task)[0] != imhi_py_answer_label(g, task)[0]:
                assert task == "SAD" and "emotion turmoil" in head, g[:120]
                fixed += 1
            elif L.parse_official(g, task) != imhi_py_answer_label(g, task):  # same class, not counted OOD
                assert task == "CAMS" and "no causes" in head, g[:120]
    assert fixed > 0


@pytest.mark.skipif(not REAL_ANSWERS, reason="bench/real_eval/answers_*.jsonl.gz not present")
@pytest.mark.parametrize("path", REAL_ANSWERS, ids=[p.name for p in REAL_ANSWERS])
def test_official_mode_equals_imhi_py_on_the_committed_generated_answers(path):
    """Every answer SmolLM2 generated in the real-data run (bench/real_eval.md), base and fine-tuned:
    the kit's official class (without the gold fix) and IMHI.py's agree, OOD counts included."""
    rows = _answers(path)
    assert len(rows) == 6057 and {r["set"] for r in rows} == {"DR", "dreaddit", "Irf", "MultiWD", "SAD"}
    for r in rows:
        assert L.parse_official(r["answer"], r["set"], gold_fix=False) == imhi_py_answer_label(r["answer"], r["set"]), r
    # the answers are varied enough to exercise the rules: several classes and some OOD answers per file
    assert len({L.parse_official(r["answer"], r["set"])[0] for r in rows if r["set"] == "SAD"}) >= 3


@pytest.mark.skipif(not REAL_ANSWERS, reason="bench/real_eval/answers_*.jsonl.gz not present")
def test_official_scores_equal_imhi_py_metrics_on_generated_answers(shared_data):
    """IMHI.py's metrics (scikit-learn on its labels) against the kit's official label_metrics, per set,
    on the fine-tuned model's generated answers and the released gold."""
    from sklearn.metrics import accuracy_score, f1_score

    rows = _answers(REAL_ANSWERS[-1])
    for task in ("DR", "dreaddit", "Irf", "MultiWD", "SAD"):
        gold = _gold(shared_data, task)
        preds = [r["answer"] for r in sorted((r for r in rows if r["set"] == task), key=lambda r: r["i"])]
        assert len(preds) == len(gold)
        gold_labels = L.parse_gold(gold, task, OFFICIAL)
        mine = [imhi_py_answer_label(p, task)[0] for p in preds]
        kit = label_metrics(gold_labels, [L.parse_official(p, task, gold_fix=False)[0] for p in preds], task)
        assert kit["weighted_f1"] == pytest.approx(100 * f1_score(gold_labels, mine, average="weighted"), abs=0.006)
        assert kit["accuracy"] == pytest.approx(100 * accuracy_score(gold_labels, mine), abs=0.006)
