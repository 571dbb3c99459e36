"""Train/test overlap that hides behind mojibake and spaced-out letters (phyassist/data/dedup.py)."""

import pandas as pd

from phyassist.data.dedup import canonical, cross_duplicates
from phyassist.data.sources import normalise, post_of


def test_canonical_key_survives_mojibake_and_spacing():
    clean = "I can’t seem to cry. I want to die"
    assert canonical("I can‚Äôt seem to cry. I w a n t to d I e") == canonical(clean) == "icantseemtocryiwanttodie"
    assert normalise("I can‚Äôt seem to cry") != normalise("I can’t seem to cry")  # what the old key missed


def test_near_duplicates_across_sets():
    test = ["My dad has had a long history of cheating on my mom and he always denies it, every single time.",
            "Completely unrelated text about gardening in spring and the tulips that grow there."]
    train = ["My dad has had a long history of cheating on my mom and he always denies it, every time.",  # near
             "M y  d a d has had a long history of cheating on my mom and he always denies it, every single time.",
             "Another post about sleep."]
    got = {(i, j) for i, j, _ in cross_duplicates(train, test, threshold=0.7)}  # Jaccard 0.79
    assert got == {(0, 0), (1, 0)}
    assert cross_duplicates(train, test, threshold=None) == [(1, 0, 1.0)]


def test_multiwd_training_posts_repeat_irf_test_queries(shared_data):
    """The real case: MultiWD records (one per wellness dimension) carry the same post as two Irf
    test queries, the training copy with "can‚Äôt" and "I w a n t to d I e"; the normalised-text
    check used so far does not see it."""
    ml = shared_data / "MentalLLaMA"
    irf = [post_of(q) for q in pd.read_csv(ml / "test_data" / "test_instruction" / "Irf.csv")["query"]]
    mwd = [post_of(q) for q in pd.read_csv(ml / "train_data" / "instruction_data" / "MultiWD" / "val.csv")["query"]]
    hits = cross_duplicates(mwd, irf, threshold=None)
    hidden = sorted({(i, j) for i, j, _ in hits if normalise(mwd[i]) != normalise(irf[j])})
    train_rows, test_rows = sorted({i for i, _ in hidden}), sorted({j for _, j in hidden})
    assert len(test_rows) == 2 and len(train_rows) >= 4, hidden
    assert all("‚Äô" in mwd[i] and "w a n t" in mwd[i] for i in train_rows)
    assert len(hits) > len(hidden)  # the plainly repeated posts are found too
