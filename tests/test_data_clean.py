"""Each cleaning rule on hand-made rows, plus property-based checks (hypothesis)."""

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from phyassist.data import clean, dedup
from phyassist.data.records import Row
from phyassist.data.sources import normalise


def row(q="How are you?", a="I am fine, thanks.", source="s", i=0, **kw):
    return Row(source, q, a, f"f.csv:{i}", **kw)


def test_empty_rows_removed_with_reason():
    rows = [row(i=1), row(a="   ", i=2), row(q="", i=3), row(a="...", i=4)]
    out = clean.drop_empty(rows)
    assert [r.origin for r in out.kept] == ["f.csv:1"]
    assert [(r.row.origin, r.rule, r.detail) for r in out.removed] == [
        ("f.csv:2", "empty", "answer is empty"), ("f.csv:3", "empty", "question is empty"),
        ("f.csv:4", "empty", "answer is empty")]


def test_chinese_is_content_not_empty_nor_special():
    rows = [row(q="我最近睡不好，怎么办？", a="试着规律作息，睡前少看手机。")]
    assert clean.drop_empty(rows).kept == rows
    assert clean.drop_links(rows).kept == rows
    fixed, dropped = clean.fix_mojibake(rows)
    assert dropped.kept == rows and fixed.fixed == 0


def test_links_detected_in_question_or_answer():
    rows = [row(q="see https://example.com/x", i=1), row(a="visit www.example.org", i=2),
            row(a="read gf.me/u/abc please", i=3), row(a="Ancestry.com is a site, no link", i=4),
            row(a="e-mail me at 5 p.m.", i=5)]
    out = clean.drop_links(rows)
    assert [r.origin for r in out.kept] == ["f.csv:4", "f.csv:5"]
    assert out.removed[0].detail == "question: https://example.com/x"
    assert out.removed[2].detail == "answer: gf.me/u/abc"


def test_too_long_chars_and_tokens():
    rows = [row(q="a" * 10, a="b" * 10, i=1), row(q="a" * 10, a="b" * 11, i=2)]
    out = clean.drop_too_long_chars(rows, 20)
    assert len(out.kept) == 1 and out.removed[0].detail == "21 characters > 20"
    toks = clean.drop_too_long_tokens(rows, {"f.csv:1": 5, "f.csv:2": 9}, 8)
    assert [r.origin for r in toks.kept] == ["f.csv:1"] and toks.removed[0].rule == "too_long_tokens"


def test_mojibake_repaired_or_dropped():
    bad = row(q="I don\u00e2\u20ac\u2122t know", a="It\u00e2\u20ac\u2122s fine")
    fixed, dropped = clean.fix_mojibake([bad], repair=True)
    assert fixed.fixed == 1 and dropped.kept[0].question == "I don\u2019t know"
    assert dropped.kept[0].answer == "It\u2019s fine"
    _, dropped = clean.fix_mojibake([bad], repair=False)
    assert not dropped.kept and dropped.removed[0].rule == "mojibake_unfixable"


def test_curly_quotes_and_accents_untouched():
    ok = row(q="“Café” – naïve… 😀", a="Straße, ñandú")
    fixed, dropped = clean.fix_mojibake([ok])
    assert fixed.fixed == 0 and dropped.kept == [ok]


def test_control_characters_stripped_keep_newlines():
    out = clean.fix_controls([row(q="a\x00b\x07c\r\nd\te", a="x\x1b[0my")])
    assert out.fixed == 1
    assert out.kept[0].question == "abc\nd\te" and out.kept[0].answer == "x[0my"


def test_whitespace_normalised():
    out = clean.fix_whitespace([row(q="  a \t b  \n\n\n\n c ", a="x\u00a0\u00a0y")])
    assert out.kept[0].question == "a b\n\nc" and out.kept[0].answer == "x y" and out.fixed == 1


def test_held_out_split():
    rows = [row(i=1, extra={"split": "train"}), row(i=2, extra={"split": "test"}), row(i=3)]
    out = clean.drop_held_out_split(rows, "train")
    assert [r.origin for r in out.kept] == ["f.csv:1", "f.csv:3"] and out.removed[0].rule == "held_out_split"
    assert [r.origin for r in clean.drop_held_out_split(rows, "test").kept] == ["f.csv:2", "f.csv:3"]


def test_exact_duplicates_by_normalised_text_first_kept():
    rows = [row(i=1), row(q="how are YOU ?", a="I am fine thanks", i=2, source="t"), row(a="other", i=3)]
    out = dedup.drop_exact_duplicates(rows)
    assert [r.origin for r in out.kept] == ["f.csv:1", "f.csv:3"]
    assert out.removed[0].detail == "same as f.csv:1 (s)"


LONG = ("Try writing the thoughts down an hour before bed so your mind knows they are parked somewhere safe "
        "and keep a steady wind down routine with the lights low and the phone in another room while you "
        "read something calm for twenty minutes before sleep every night of the week")


def test_near_duplicates_found_and_threshold_respected():
    rows = [row(q="Overthinking?", a=LONG, i=1), row(q="Overthinking?", a=LONG.replace("week", "month"), i=2),
            row(q="Chores?", a="Split the chores fairly and review the plan after a month together.", i=3)]
    out = dedup.drop_near_duplicates(rows, 0.9)
    assert [r.origin for r in out.kept] == ["f.csv:1", "f.csv:3"]
    assert out.removed[0].detail.startswith("Jaccard 0.9") and "f.csv:1" in out.removed[0].detail
    assert len(dedup.drop_near_duplicates(rows, 1.0).kept) == 3


def test_near_duplicates_in_chinese():
    base = "我最近总是睡不着，晚上一直想白天发生的事情，心里很烦，不知道应该怎么办才好，希望有人能给我一些建议"
    rows = [row(q=base, a="规律作息。", i=1), row(q=base + "。", a="规律作息！", i=2), row(q="今天很开心。", a="太好了。", i=3)]
    assert len(dedup.drop_near_duplicates(rows, 0.9).kept) == 2


def test_near_dedup_fast_enough_for_5k_rows():
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    rows = [row(q=" ".join(rng.choices(words, k=60)), a=" ".join(rng.choices(words, k=60)), i=i) for i in range(5000)]
    t0 = time.perf_counter()
    out = dedup.drop_near_duplicates(rows, 0.9)
    assert len(out.kept) == 5000
    assert time.perf_counter() - t0 < 60  # a generous bound for a loaded 2-core machine; typically ~3 s


def test_near_dedup_is_deterministic():
    rows = [row(q=f"question {i % 7} " + LONG[: 40 + i], a=LONG, i=i) for i in range(40)]
    a = [r.origin for r in dedup.drop_near_duplicates(rows, 0.8).kept]
    b = [r.origin for r in dedup.drop_near_duplicates(rows, 0.8).kept]
    assert a == b


# --- properties -------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=150, deadline=None)
@given(texts)
def test_whitespace_normalisation_idempotent_and_tidy(t):
    once = clean.normalise_whitespace(t)
    assert clean.normalise_whitespace(once) == once
    assert "\n\n\n" not in once and once == once.strip()
    assert normalise(once) == normalise(t)  # content (letters, digits) unchanged


@settings(max_examples=150, deadline=None)
@given(texts)
def test_control_stripping_removes_all_controls(t):
    out = clean.strip_controls(t)
    assert all(ch in "\n\t" or not (ord(ch) < 32 or 127 <= ord(ch) <= 159) for ch in out)
    assert clean.strip_controls(out) == out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(texts, texts), max_size=12))
def test_rules_partition_rows(pairs):
    """Every rule keeps or removes each row exactly once: nothing is dropped silently."""
    rows = [row(q=q, a=a, i=i) for i, (q, a) in enumerate(pairs)]
    for out in (clean.drop_empty(rows), clean.drop_links(rows), clean.drop_too_long_chars(rows, 50),
                dedup.drop_exact_duplicates(rows), dedup.drop_near_duplicates(rows, 0.9),
                clean.fix_mojibake(rows)[1]):
        assert len(out.kept) + len(out.removed) == len(rows)
        assert {r.origin for r in out.kept} | {r.row.origin for r in out.removed} == {r.origin for r in rows}
        assert all(r.rule and r.detail for r in out.removed)


def test_training_post_hidden_by_mojibake_and_spacing_is_dropped_as_test_overlap():
    """The real case (MultiWD val vs Irf test): the same post with "can‚Äôt" and letters spaced apart."""
    from phyassist.data.split import leakage, test_keys

    post = "I can’t sleep and I want to disappear, nobody would notice."
    wrap = 'Consider this post: "{}" Question: Does the poster suffer from loneliness?'
    test = [row(q=wrap.format(post), source="Irf", i=7)]
    hidden = post.replace("’", "‚Äô").replace("want", "w a n t")
    train = [row(q=wrap.format(hidden), source="MultiWD", i=1), row(q=wrap.format("Lovely day at the beach."), i=2)]
    out = clean.drop_test_overlap(train, test_keys(test))
    assert [r.row.origin for r in out.removed] == ["f.csv:1"]
    assert "mojibake or spacing" in out.removed[0].detail
    report = leakage([{"question": r.question} for r in train], {"Irf": test})
    assert report["Irf"]["canonical_post"] == 1 and report["Irf"]["normalised_post"] == 0
