"""From answer text to class label, in two modes, for the IMHI sets and any set defined in YAML.

``official``: MentalLLaMA's rules, so that numbers compare with its papers. Generated text follows
``src/IMHI.py`` (``calculate_f1``): the text before the first case-sensitive ``"Reasoning:"``,
lower-cased, is tested against each class's phrase in a fixed order by plain substring
containment; the first phrase found wins and an answer that contains none gets the set's default
class (counted as ``unlabelled`` but scored as that class). Gold answers follow
``src/label_inference.py`` (whose gold phrases match the released SAD and CAMS gold, where
``IMHI.py``'s do not); a gold answer no official phrase matches falls back to the robust parser
(the kit's documented gold fix) and, failing that, the pair is left out, as MentalLLaMA does for
swmh.

``robust``: the kit's parser for answers that do not follow the gold's exact shape. No character
window (the whole label part is read, however long a preamble); when nothing before "Reasoning:"
names a class, the last class named after it (reasoning-first answers conclude at the end); word
patterns with inflections and compounds instead of substrings ("families", "depressive", and never
"no" inside "know"); a class mention negated in its clause ("not related to work") does not count;
a yes/no set without a yes or no word reads the first sentence about the question and calls it
"no" when a negation ("hardly", "without", "unlikely", "n't" ...) qualifies it. An answer naming no
class is ``unlabelled`` and counts as wrong.

The IMHI classes and their order follow MentalLLaMA's MentalBERT classifiers
(``label_inference.py``), so a classifier's argmax index names the same class. docs/evaluate.md
tabulates every difference between the modes with an example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

UNLABELLED = "unlabelled"
OFFICIAL, ROBUST = "official", "robust"
MODES = (OFFICIAL, ROBUST)


@dataclass(frozen=True)
class Task:
    """One classification set.

    ``patterns``: robust word regexes per class. ``official``: (regex, class) rules tried in order
    on the label part of generated text (IMHI phrases are escaped substrings); ``official_gold``:
    the same for gold answers (empty: use ``official``); ``gold_fix``: (regex, class) rules the
    kit adds to ``official``, each right after the last rule of its class, so that the released
    gold phrasing IMHI.py misses is read ("emotion turmoil", "no causes"); ``default``: the class
    an official answer gets when no rule matches (None: it stays unlabelled).
    """

    name: str
    classes: tuple[str, ...]
    patterns: dict[str, tuple[str, ...]]
    question: str = ""
    official: tuple[tuple[str, str], ...] = ()
    official_gold: tuple[tuple[str, str], ...] = ()
    gold_fix: tuple[tuple[str, str], ...] = ()
    default: str | None = None
    binary: bool = False
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def index(self, label: str) -> int:
        return self.classes.index(label)

    def robust_patterns(self) -> dict[str, list[re.Pattern]]:
        if "robust" not in self._compiled:
            self._compiled["robust"] = {c: [re.compile(p, re.IGNORECASE) for p in pats]
                                        for c, pats in self.patterns.items()}
        return self._compiled["robust"]

    def official_rules(self, gold: bool, fix: bool = True) -> list[tuple[re.Pattern, str]]:
        key = ("gold" if gold else "pred", fix)
        if key not in self._compiled:
            rules = list((self.official_gold or self.official) if gold else self.official)
            if fix and not gold:
                for p, c in self.gold_fix:
                    at = max(i for i, (_, rc) in enumerate(rules) if rc == c) + 1
                    rules.insert(at, (p, c))
            self._compiled[key] = [(re.compile(p), c) for p, c in rules]
        return self._compiled[key]


def _sub(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """IMHI rules: (phrase, class) -> (escaped substring regex, class)."""
    return tuple((re.escape(p), c) for p, c in pairs)


_YES_NO = ("no", "yes")
# Binary sets: a yes or no answer word decides. "no" as a word, never inside "know" or "not".
_BINARY = {"yes": (r"\byes\b",), "no": (r"\bno\b",)}
_BINARY_OFFICIAL = _sub(("yes", "yes"), ("no", "no"))


def _binary(name: str, question: str) -> Task:
    return Task(name, _YES_NO, _BINARY, question, official=_BINARY_OFFICIAL, default="no", binary=True)


TASKS: dict[str, Task] = {t.name: t for t in [
    _binary("DR", "Does the poster suffer from depression?"),
    _binary("dreaddit", "Does the poster suffer from stress?"),
    _binary("Irf", "Does the post show risk of thwarted belongingness / perceived burdensomeness?"),
    _binary("MultiWD", "Does the <dimension> wellness dimension exist in the post?"),
    _binary("loneliness", "Does the poster suffer from loneliness?"),
    _binary("CLP", "Does the poster suffer from depression?"),
    Task("SAD", ("school", "financial", "family", "social", "work", "health", "emotional", "everyday",
                 "other"),
         {"school": (r"\b(school|home|course)\w*", r"\bacademic\w*", r"\bstud(y|ies|ying)\b", r"\bexams?\b",
                     r"\b(college|universit(y|ies))\b"),
          "financial": (r"\bfinanc\w*", r"\bmoney\b", r"\bdebts?\b"),
          "family": (r"\bfamil(y|ies|ial)\b", r"\b(parents?|mother|father|mom|dad|siblings?|brothers?|sisters?)\b"),
          "social": (r"\bsocial(ly)?\b",),
          "work": (r"\bwork(s|ing|ed|place|places|load|-related)?\b", r"\bjobs?\b", r"\bcareers?\b",
                   r"\bemploy\w*"),
          "health": (r"\bhealth\w*", r"\b(illness|illnesses|medical)\b"),
          "emotional": (r"\bemotion\w*",),
          "everyday": (r"\beveryday\b", r"\bdecisions?\b", r"\bdecision-making\b"),
          "other": (r"\bother\b",)},
         "What is the stress cause of this post?",
         official=_sub(("school", "school"), ("financial", "financial"), ("family", "family"),
                       ("social", "social"), ("work", "work"), ("health", "health"),
                       ("emotional", "emotional"), ("decision", "everyday"), ("other", "other")),
         official_gold=_sub(("school", "school"), ("financial problem", "financial"),
                            ("family issues", "family"), ("social relationships", "social"), ("work", "work"),
                            ("health issues", "health"), ("emotion turmoil", "emotional"),
                            ("everyday decision making", "everyday"), ("other", "other")),
         gold_fix=_sub(("emotion turmoil", "emotional")), default="other"),
    Task("CAMS", ("none", "bias", "job", "medication", "relation", "alienation"),
         {"none": (r"\bno (specific |clear |identifiable |apparent )?causes?\b", r"\bnone\b"),
          "bias": (r"\bbias\w*", r"\babus\w*"),
          "job": (r"\bjobs?\b", r"\bcareers?\b", r"\bunemploy\w*"),
          "medication": (r"\bmedica\w*",),
          "relation": (r"\brelation\w*",),
          "alienation": (r"\balienat\w*",)},
         "What cause of depression does this post show?",
         official=_sub(("none", "none"), ("bias", "bias"), ("jobs", "job"), ("medication", "medication"),
                       ("relationship", "relation"), ("alienation", "alienation")),
         official_gold=_sub(("no causes", "none"), ("bias or abuse", "bias"), ("jobs and career", "job"),
                            ("medication", "medication"), ("relationship", "relation"),
                            ("alienation", "alienation")),
         gold_fix=_sub(("no causes", "none")), default="none"),
    Task("t-sid", ("depression", "suicide", "ptsd", "control"),
         {"depression": (r"\bdepress\w*",),
          "suicide": (r"\bsuicid\w*", r"\bself[- ]harm\w*"),
          "ptsd": (r"\bptsd\b", r"\bpost-?traumatic"),
          "control": (r"\bno (signs? of )?(any )?mental (health )?(disorders?|illness\w*|conditions?|problems?)\b",
                      r"\bcontrol\b")},
         "What mental disorder does this post show?",
         official=_sub(("depression", "depression"), ("suicide", "suicide"), ("ptsd", "ptsd"),
                       ("no mental", "control")),
         official_gold=_sub(("depression", "depression"), ("suicide or self-harm", "suicide"), ("ptsd", "ptsd"),
                            ("no mental", "control")),
         default="control"),
    Task("swmh", ("depression", "suicide", "anxiety", "bipolar", "no mental"),
         {"depression": (r"\bdepress\w*",), "suicide": (r"\bsuicid\w*",), "anxiety": (r"\banxi\w*",),
          "bipolar": (r"\bbipolar\b",),
          "no mental": (r"\bno (signs? of )?(any )?mental (health )?(disorders?|illness\w*|conditions?)\b",)},
         "What mental disorder does this post show?",
         official=_sub(("no mental", "no mental"), ("suicide", "suicide"), ("depression", "depression"),
                       ("anxiety", "anxiety"), ("bipolar", "bipolar")),
         default="no mental"),
]}


def task_from_spec(name: str, classes: dict[str, Sequence[str]], default: str | None = None) -> Task:
    """A set defined in YAML: ``classes`` maps each class to regexes (case-insensitive).

    Official mode for such a set: the first class (in the listed order) with a pattern in the label
    part, else ``default``; robust mode: the earliest non-negated mention, as for IMHI.
    """
    if not classes:
        raise ValueError(f"set {name!r}: 'classes' is empty")
    for c, pats in classes.items():
        if not pats:
            raise ValueError(f"set {name!r}: class {c!r} has no patterns")
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"set {name!r}: class {c!r}: pattern {p!r} is not a regex ({e})") from None
    if default is not None and default not in classes:
        raise ValueError(f"set {name!r}: default class {default!r} is not one of {list(classes)}")
    names = tuple(classes)
    return Task(name, names, {c: tuple(p) for c, p in classes.items()},
                official=tuple(("(?i)" + p, c) for c in names for p in classes[c]), default=default,
                binary=set(names) == {"yes", "no"})


def get_task(name) -> Task:
    """The task by set name (or a :class:`Task` itself); a clear error listing the known sets."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known IMHI sets are {', '.join(sorted(TASKS))} "
                         "(define others with classes in evaluate.sets)")
    return TASKS[name]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown label mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


# ---------------------------------------------------------------------------------------- official

def official_part(text) -> str:
    """IMHI.py's label part: before the first case-sensitive "Reasoning:", lower-cased."""
    return str(text).split("Reasoning:")[0].lower()


def _official_rule(text: str, rules) -> str | None:
    return next((c for p, c in rules if p.search(text)), None)


def parse_official(text, task, gold_fix: bool = True) -> tuple[str, bool]:
    """(class, defaulted): IMHI.py's label of a generated answer; ``defaulted`` when no phrase
    matched and the set's default class was given (UNLABELLED when the set has none).
    ``gold_fix=False``: IMHI.py alone, without the kit's phrases for the released SAD/CAMS gold."""
    t = get_task(task)
    found = _official_rule(official_part(text), t.official_rules(gold=False, fix=gold_fix))
    if found is not None:
        return found, False
    return (t.default or UNLABELLED), True


def parse_official_gold(text, task) -> str:
    """label_inference.py's gold label; the robust parser where its phrases miss; else UNLABELLED."""
    t = get_task(task)
    found = _official_rule(official_part(text), t.official_rules(gold=True))
    return found if found is not None else parse_robust(text, t)


# ------------------------------------------------------------------------------------------ robust

_NEGATION = re.compile(
    r"\b(not|no|never|none|nor|neither|without|hardly|barely|scarcely|unlikely|nothing|cannot|lacks?|"
    r"lacking|absence|absent|free (of|from)|rather than|instead of)\b|n't\b|n’t\b", re.IGNORECASE)
# Words of a sentence that answers a yes/no question about the post (the question's verbs and topics).
_ASSERTION = re.compile(
    r"\b(suffer\w*|shows?|showing|shown|exists?|existing|displays?|exhibits?|experienc\w+|indicat\w+|"
    r"presents?|risk\w*|signs?|evident|evidence|struggl\w+|seems?|appears?|stress\w*|depress\w*|"
    r"lonel\w*|burden\w*|belong\w*|wellness|dimension)\b", re.IGNORECASE)
_CLAUSE = re.compile(r"[.;:!?\n]|,\s*(but|while|whereas|although|though|rather|instead|however)\b|\bbut\b",
                     re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?\n;:])\s+")
_REASONING = re.compile(r"reasoning\s*:", re.IGNORECASE)
_NEGATION_WINDOW = 6  # words before a class mention that can negate it ("not related to work")


def _clause_before(text: str, start: int) -> str:
    """The words of the current clause before ``start``, at most ``_NEGATION_WINDOW`` of them."""
    head = text[:start]
    cut = max((m.end() for m in _CLAUSE.finditer(head)), default=0)
    return " ".join(head[cut:].split()[-_NEGATION_WINDOW:])


def _mentions(text: str, t: Task) -> list[tuple[int, int, str]]:
    """(start, -length, class) of every non-negated class mention (self-negative classes such as
    "no causes" are never treated as negated)."""
    out = []
    for label, pats in t.robust_patterns().items():
        for p in pats:
            for m in p.finditer(text):
                negative_class = bool(re.match(r"\s*(no|none)\b", m.group(0), re.IGNORECASE))
                if not negative_class and _NEGATION.search(_clause_before(text, m.start())):
                    continue
                out.append((m.start(), -len(m.group(0)), label))
    return sorted(out)


def _binary_answer(text: str, last: bool) -> str | None:
    """yes/no from an answer word, else from the first (last) sentence that asserts something."""
    words = list(re.finditer(r"\b(yes|no)\b", text, re.IGNORECASE))
    if words:
        return (words[-1] if last else words[0]).group(1).lower()
    sentences = [s for s in _SENTENCE.split(text) if _ASSERTION.search(s)]
    if not sentences:
        return None
    s = sentences[-1] if last else sentences[0]
    return "no" if _NEGATION.search(s) else "yes"


# A sentence that states a label ("This post shows ...", "... related to work", "caused by ...").
_LABEL_CUE = re.compile(r"\b(shows?|related to|relates to|caused? by|causes?|due to|stems? from|because of|"
                        r"is about|categor\w*|label\w*|answer|classif\w*|most likely|indicat\w+)\b",
                        re.IGNORECASE)


def _sentences(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for part in _SENTENCE.split(text):
        start = text.find(part, pos)
        out.append((start, part))
        pos = start + len(part)
    return out


def _robust_segment(text: str, t: Task, last: bool) -> str | None:
    """The class of one segment: mentions in sentences that state a label come first (so a
    preamble that merely uses a class word, "the emotional tone", does not decide), then any."""
    if t.binary:
        return _binary_answer(text, last)
    found = _mentions(text, t)
    if not found:
        return None
    cue_spans = [(a, a + len(s)) for a, s in _sentences(text) if _LABEL_CUE.search(s)]
    stated = [f for f in found if any(a <= f[0] < b for a, b in cue_spans)]
    pool = stated or found
    if last:
        return max(pool, key=lambda f: (f[0], -f[1]))[2]
    return pool[0][2]


def parse_robust(text, task) -> str:
    """The robust label (see the module docstring), or ``UNLABELLED``."""
    t = get_task(task)
    text = "" if text is None else str(text).replace("’", "'")
    head, *rest = _REASONING.split(text, maxsplit=1)
    found = _robust_segment(head, t, last=False) if head.strip() else None
    if found is None and rest:
        found = _robust_segment(rest[0], t, last=True)
    return found or UNLABELLED


# ---------------------------------------------------------------------------------------- dispatch

def parse_label(text, task, mode: str = ROBUST) -> str:
    """Map a generated answer to its class name (official: the default class when none matched)."""
    return parse_official(text, task)[0] if check_mode(mode) == OFFICIAL else parse_robust(text, task)


def parse_labels(texts: Sequence, task, mode: str = ROBUST) -> list[str]:
    return [parse_label(x, task, mode) for x in texts]


def parse_gold(texts: Sequence, task, mode: str = ROBUST) -> list[str]:
    """Gold labels: label_inference.py's rules (official) or the robust parser."""
    if check_mode(mode) == OFFICIAL:
        return [parse_official_gold(x, task) for x in texts]
    return [parse_robust(x, task) for x in texts]


@dataclass
class Labelled:
    """One set's labels in one mode: aligned gold and predictions (pairs whose gold names no
    class left out), how many answers were unlabelled (official: given the default class), and
    the row numbers (0-based) kept."""

    mode: str
    gold: list[str]
    pred: list[str]
    unlabelled: int
    dropped_gold: int
    rows: list[int]


def label_set(goldens: Sequence, generated: Sequence, task, mode: str) -> Labelled:
    """Gold and generated answers of one set labelled in ``mode``, aligned for scoring."""
    check_mode(mode)
    if len(goldens) != len(generated):
        raise ValueError(f"{get_task(task).name}: {len(goldens)} gold answers but {len(generated)} predictions")
    gold = parse_gold(goldens, task, mode)
    if mode == OFFICIAL:
        parsed = [parse_official(x, task) for x in generated]
        pred, missed = [p for p, _ in parsed], [d for _, d in parsed]
    else:
        pred = parse_labels(generated, task, mode)
        missed = [p == UNLABELLED for p in pred]
    rows = [i for i, g in enumerate(gold) if g != UNLABELLED]
    return Labelled(mode, [gold[i] for i in rows], [pred[i] for i in rows],
                    sum(missed[i] for i in rows), len(gold) - len(rows), rows)


def label_metrics(gold: list[str], pred: list[str], task, unlabelled: int | None = None) -> dict:
    """Accuracy and weighted/micro/macro F1 (×100), as MentalLLaMA computes them.

    F1 averages run over the classes present in gold or predictions (scikit-learn's default,
    which IMHI.py uses). Micro F1 counts every answer, so it equals accuracy (MentalLLaMA's
    definition: every answer gets a class). An ``unlabelled`` prediction (robust mode) is a miss for
    its gold class and a false positive for no class.
    """
    from phyassist.evaluate.stats import f1_scores

    t = get_task(task)
    if len(gold) != len(pred):
        raise ValueError(f"{t.name}: {len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError(f"{t.name}: no examples to score")
    bad = [i for i, g in enumerate(gold) if g not in t.classes]
    if bad:
        raise ValueError(f"{t.name}: gold answer(s) at row(s) {bad[:5]} name no {t.name} class")
    out = {"n": len(gold), "unlabelled": sum(p == UNLABELLED for p in pred) if unlabelled is None else unlabelled}
    out.update(f1_scores(gold, pred, t.classes))
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def majority_label(gold: list[str]) -> str:
    """The most frequent gold class (ties: the first in order of appearance)."""
    counts: dict[str, int] = {}
    for g in gold:
        counts[g] = counts.get(g, 0) + 1
    if not counts:
        raise ValueError("majority_label: no gold labels")
    return max(counts, key=lambda k: counts[k])
