"""IMHI label sets and a rule-based parser from answer text to class label.

Every IMHI answer starts with a label sentence, then ``Reasoning: ...``. The classes and their
order follow MentalLLaMA's MentalBERT classifiers (``src/label_inference.py``), so that the
classifier's argmax index and the rule parser name the same class. The patterns were written
from the released gold strings of every set (test, train and val): MentalLLaMA's own rules
miss the SAD gold ("emotion turmoil", "other stress causes") and the CAMS gold ("no causes").

A class is chosen by the EARLIEST pattern hit in the label part of the text (before
"Reasoning:"), so a generated answer that names its label first and mentions other
classes later in the sentence still parses to its label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class Task:
    """One IMHI data set: its classes (classifier order) and patterns that name each class."""

    name: str
    classes: tuple[str, ...]
    patterns: dict[str, tuple[str, ...]]
    question: str

    def index(self, label: str) -> int:
        return self.classes.index(label)


_YES_NO = ("no", "yes")
# Binary sets: "Yes, the poster suffers ..." / "No, the post does not show ...". A leading
# yes/no word decides; without one, a negation ("not", "n't", "never") means "no".
_BINARY = {"yes": (r"\byes\b",), "no": (r"\bno\b",)}
_NEGATION = re.compile(r"\b(not|never|none)\b|n't\b")
_AFFIRMATION = re.compile(r"\b(suffers?|shows?|exists?|has|is at risk)\b")


def _binary(name: str, question: str) -> Task:
    return Task(name, _YES_NO, _BINARY, question)


TASKS: dict[str, Task] = {t.name: t for t in [
    _binary("DR", "Does the poster suffer from depression?"),
    _binary("dreaddit", "Does the poster suffer from stress?"),
    _binary("Irf", "Does the post show risk of thwarted belongingness / perceived burdensomeness?"),
    _binary("MultiWD", "Does the <dimension> wellness dimension exist in the post?"),
    _binary("loneliness", "Does the poster suffer from loneliness?"),
    _binary("CLP", "Does the poster suffer from depression?"),
    Task("SAD", ("school", "financial", "family", "social", "work", "health", "emotional", "everyday",
                 "other"),
         {"school": (r"\bschool", r"\bacademic", r"\bstud(y|ies|ying)\b", r"\bexams?\b"),
          "financial": (r"\bfinanc", r"\bmoney\b"),
          "family": (r"\bfamily\b",),
          "social": (r"\bsocial\b",),
          "work": (r"\bwork\b", r"\bjobs?\b", r"\bcareer\b"),
          "health": (r"\bhealth\b",),
          "emotional": (r"\bemotion",),
          "everyday": (r"\beveryday\b", r"\bdecision"),
          "other": (r"\bother\b",)},
         "What is the stress cause of this post?"),
    Task("CAMS", ("none", "bias", "job", "medication", "relation", "alienation"),
         {"none": (r"\bno (specific |clear )?causes?\b", r"\bnone\b"),
          "bias": (r"\bbias", r"\babuse"),
          "job": (r"\bjobs?\b", r"\bcareer"),
          "medication": (r"\bmedica",),
          "relation": (r"\brelation",),
          "alienation": (r"\balienat",)},
         "What cause of depression does this post show?"),
    Task("t-sid", ("depression", "suicide", "ptsd", "control"),
         {"depression": (r"\bdepress",),
          "suicide": (r"\bsuicid", r"\bself-harm"),
          "ptsd": (r"\bptsd\b", r"post-traumatic"),
          "control": (r"\bno mental disorders?\b", r"\bcontrol\b")},
         "What mental disorder does this post show?"),
    Task("swmh", ("depression", "suicide", "anxiety", "bipolar", "no mental"),
         {"depression": (r"\bdepress",), "suicide": (r"\bsuicid",), "anxiety": (r"\banxi",),
          "bipolar": (r"\bbipolar",), "no mental": (r"\bno mental",)},
         "What mental disorder does this post show?"),
]}

_COMPILED = {name: {c: [re.compile(p) for p in pats] for c, pats in t.patterns.items()}
             for name, t in TASKS.items()}


def get_task(name: str) -> Task:
    """The task by set name; a clear error listing the known sets otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known IMHI sets are {', '.join(sorted(TASKS))}")
    return TASKS[name]


def label_part(text: str, max_chars: int = 200) -> str:
    """The text before "Reasoning:" (where IMHI answers state their label), lower-cased."""
    head = re.split(r"reasoning\s*:", str(text), maxsplit=1, flags=re.IGNORECASE)[0]
    return head.strip().lower()[:max_chars]


def _earliest(text: str, compiled: dict[str, list[re.Pattern]]) -> str | None:
    best: tuple[int, int, str] | None = None
    for label, pats in compiled.items():
        for p in pats:
            m = p.search(text)
            if m and (best is None or (m.start(), -len(m.group(0))) < best[:2]):
                best = (m.start(), -len(m.group(0)), label)
    return best[2] if best else None


def parse_label(text: str, task: str) -> str:
    """Map an answer (gold or generated) to its class name, or ``UNLABELLED``."""
    t = get_task(task)
    head = label_part(text)
    found = _earliest(head, _COMPILED[t.name])
    if found is None and t.classes == _YES_NO:
        if _NEGATION.search(head):
            found = "no"
        elif _AFFIRMATION.search(head):
            found = "yes"
    return found or UNLABELLED


def parse_labels(texts: list[str], task: str) -> list[str]:
    return [parse_label(x, task) for x in texts]


def label_metrics(gold: list[str], pred: list[str], task: str) -> dict:
    """Accuracy and weighted/micro/macro F1 (×100) over the task's classes.

    An unlabelled prediction counts as wrong: it is a miss for its gold class and a false
    positive for no class. Gold answers must all parse (the released sets do).
    """
    from sklearn.metrics import accuracy_score, f1_score

    t = get_task(task)
    if len(gold) != len(pred):
        raise ValueError(f"{task}: {len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError(f"{task}: no examples to score")
    bad = [i for i, g in enumerate(gold) if g not in t.classes]
    if bad:
        raise ValueError(f"{task}: gold answer(s) at row(s) {bad[:5]} name no {task} class")
    labels = [c for c in t.classes if c in set(gold) | set(pred)]
    out = {"n": len(gold), "unlabelled": sum(p == UNLABELLED for p in pred),
           "accuracy": 100 * accuracy_score(gold, pred)}
    for avg in ("weighted", "micro", "macro"):
        out[f"{avg}_f1"] = 100 * f1_score(gold, pred, labels=labels, average=avg, zero_division=0)
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def majority_label(gold: list[str]) -> str:
    """The most frequent gold class (ties: the first in order of appearance)."""
    counts: dict[str, int] = {}
    for g in gold:
        counts[g] = counts.get(g, 0) + 1
    return max(counts, key=lambda k: counts[k])
