"""Chat-template formatting against the tokenizer, token counts, note sections, the histogram."""

import pytest

from phyassist.data.format import (count_tokens, format_rows, mistral_v1_tokenizer, note_sections,
                                   plot_token_lengths, token_stats)
from phyassist.data.records import Row
from phyassist.models.chat_templates import build_messages
from phyassist.models.loading import load_tokenizer
from phyassist.models.schema import ModelConfig

Q = 'Consider this post: "我很累 and tired." Question: Does the poster suffer from stress?'
A = "Yes, the poster suffers from stress. Reasoning: fatigue."


@pytest.fixture(scope="module")
def mixtral_tok():
    """tiny-mixtral (SmolLM2's vocabulary) with the kit's MIXTRAL template."""
    return load_tokenizer(ModelConfig(name="tiny-mixtral", chat_template="mixtral"))


@pytest.mark.parametrize("system", [None, "You are a counsellor's assistant."])
def test_mixtral_format_matches_apply_chat_template(mixtral_tok, system):
    rec = format_rows(mixtral_tok, [Row("DR", Q, A, "f:2")], system)[0]
    expected = mixtral_tok.apply_chat_template(build_messages(Q, A, system), tokenize=False)
    assert rec["text"] == expected == rec["prompt"] + rec["completion"]
    bos, eos = mixtral_tok.bos_token, mixtral_tok.eos_token
    user = f"{system}\n\n{Q}" if system else Q
    assert rec["text"] == f"{bos}[INST] {user} [/INST] {A}{eos}"
    assert rec["completion"] == f" {A}{eos}" and rec["answer"] == A and rec["question"] == Q


def test_token_counts_match_tokenizer(mixtral_tok):
    recs = format_rows(mixtral_tok, [Row("DR", Q, A, "f:2"), Row("DR", "hi", "ok", "f:3")])
    n = count_tokens(mixtral_tok, [r["text"] for r in recs])
    assert n == [len(mixtral_tok.apply_chat_template(build_messages(r["question"], r["answer"]), tokenize=True,
                                                     return_dict=True)["input_ids"]) for r in recs]


def test_chatml_for_smollm2():
    tok = load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))
    rec = format_rows(tok, [Row("DR", "How do I sleep?", "Keep a routine.", "f:2")], "Be kind.")[0]
    assert rec["prompt"].startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHow do I sleep?")
    assert rec["prompt"].endswith("<|im_start|>assistant\n")
    assert rec["completion"] == "Keep a routine.<|im_end|>\n"


def test_study_mixtral_text_and_tokens_offline():
    """The study's format with Mixtral's own (Mistral v1) vocabulary, no Hub access."""
    try:
        tok = mistral_v1_tokenizer()
    except FileNotFoundError as exc:
        pytest.skip(f"Mistral v1 tokenizer unavailable: {exc}")
    rec = format_rows(tok, [Row("DR", "Q?", "A.", "f:2")])[0]
    assert rec["text"] == "<s>[INST] Q? [/INST] A.</s>"
    ids = tok(rec["text"], add_special_tokens=False)["input_ids"]
    assert ids[:4] == [1, 733, 16289, 28793] and ids[-1] == 2  # <s> "[INST]" ... </s>
    assert count_tokens(tok, [rec["text"]]) == [len(ids)] and len(tok) == 32000


def test_note_sections_keep_gold_answer(mixtral_tok):
    assert note_sections("Yes, the post shows this risk. Reasoning: isolation.", "imhi") == \
        "Analysis:\nYes, the post shows this risk.\nisolation."
    assert note_sections("Keep a routine.", "counsel_chat") == "Advice:\nKeep a routine."
    rec = format_rows(mixtral_tok, [Row("DR", Q, A, "f:2")], kinds={"DR": "imhi"}, sections=True)[0]
    assert rec["answer"] == A and "Analysis:\nYes, the poster suffers from stress.\nfatigue." in rec["completion"]


def test_token_stats_and_histogram(tmp_path):
    stats = token_stats({"a": [1, 2, 3, 4], "b": [10]})
    assert stats["a"] == {"count": 4, "mean": 2.5, "median": 2.5, "p95": 4, "max": 4, "min": 1, "total": 10}
    assert stats["all"]["count"] == 5 and stats["all"]["max"] == 10
    p = plot_token_lengths({"a": [1, 2, 3, 4], "b": [10, 40]}, tmp_path / "h.png", "t", 30)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
