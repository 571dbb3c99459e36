"""The app's draft operations under concurrency: what another session (or the same counselor)
changes while the model writes is never overwritten by the model's result. The model is a
scripted stand-in that runs the other session's edits between two of its pieces."""

from __future__ import annotations


import pytest
from conftest import run_concurrently

from phyassist.app import notes as N
from phyassist.app.service import CounselorService
from phyassist.app.storage import Store
from phyassist.config import load_config

USER = "alice"
FIRST = ("Symptom type: low mood\nReasons:\n1. Lost the job at the bakery.\n2. Sleeps badly.\n"
         "Advice:\n1. Daily walk.\n2. Regular meals.")
REGEN = ("Symptom type: depressive episode\nReasons:\n1. Job loss and loss of routine.\n"
         "2. Early waking.\nAdvice:\n1. Behavioural activation.\n")


class ScriptedModel:
    """Yields ``text`` in pieces; ``during`` runs after the first piece, as if another session
    acted while the model was writing."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.max_positions = 2048
        self.text, self.during = "", None

    def stream(self, prompt, max_new_tokens, patient_id=None, guided=False):
        prefix = "Symptom type:"
        body = self.text[len(prefix):] if self.text.startswith(prefix) else self.text
        pieces = [body[:5], body[5:]]
        for i, piece in enumerate(pieces):
            yield piece
            if i == 0 and self.during is not None:
                self.during()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from phyassist.models.registry import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture
def two_sessions(tmp_path, tokenizer):
    """The app's service with the scripted model, and a second session on its own store connection."""
    data, key_file = tmp_path / "data", tmp_path / "keys" / "app.key"
    cfg = load_config("smoke", [f"app.data_dir={data}", f"app.key_file={key_file}"])
    open_store = lambda: Store.open(data, key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=key_file)  # noqa: E731
    model = ScriptedModel(tokenizer)
    svc = CounselorService(cfg, open_store(), model, None)
    other = CounselorService(cfg, open_store(), None, None)
    pid = svc.create_patient(USER, {"name": "Test Patient", "age": "40"})
    model.text = FIRST
    *_, done = svc.stream_analysis(USER, pid, "I lost my job and cannot sleep.")
    assert done.final and done.ok and len(done.draft["reasons"]) == 2
    yield svc, other, model, pid
    svc.close()
    other.close()


def _texts(items):
    return [i["text"] for i in items]


def test_regenerate_all_keeps_edits_made_while_it_runs(two_sessions):
    svc, other, model, pid = two_sessions
    svc.edit_item(USER, pid, "reason 1", None, "mention the bakery")

    def meanwhile():  # the second session edits, comments and adds while the model writes
        other.edit_item("bob", pid, "reason 2", "Wakes at 4 am every day", None)
        other.edit_item("bob", pid, "advice 2", None, "ask about breakfast")
        other.add_item("bob", pid, "advice", "Keep a sleep diary", "two weeks")

    model.text, model.during = REGEN, meanwhile
    *_, done = svc.regenerate_all(USER, pid)
    stored = svc.get_draft(USER, pid)
    assert done.final and done.ok and done.draft == stored
    assert stored["symptom_type"]["text"] == "depressive episode"
    assert _texts(stored["reasons"]) == ["Job loss and loss of routine.", "Early waking.", "Wakes at 4 am every day"]
    assert _texts(stored["advice"]) == ["Behavioural activation.", "Regular meals.", "Keep a sleep diary"]
    assert stored["advice"][1]["comment"] == "ask about breakfast" and stored["advice"][2]["comment"] == "two weeks"
    assert "mention the bakery" not in str(stored)  # seen by the model before it started: not re-added
    assert "kept: reason 3, advice 2, advice 3" in done.message


def test_regenerate_all_without_concurrent_edits_replaces_the_draft(two_sessions):
    svc, _other, model, pid = two_sessions
    before = svc.get_draft(USER, pid)
    model.text = REGEN
    *_, done = svc.regenerate_all(USER, pid)
    assert done.ok and "kept" not in done.message
    after = svc.get_draft(USER, pid)
    assert _texts(after["reasons"]) == ["Job loss and loss of routine.", "Early waking."]
    assert after["draft_id"] == before["draft_id"] and after["version"] == before["version"] + 1


def test_regenerate_all_does_not_resurrect_a_saved_draft(two_sessions):
    svc, other, model, pid = two_sessions
    model.text, model.during = REGEN, lambda: other.save_draft_as_note("bob", pid)
    *_, done = svc.regenerate_all(USER, pid)
    assert done.final and not done.ok and "saved or discarded" in done.message
    assert svc.get_draft(USER, pid) is None
    assert svc.store.list_notes(USER, pid)[0]["reasons"] == [
        "Lost the job at the bakery.", "Sleeps badly."]


def test_regenerate_all_unparsed_text_keeps_concurrent_edits(two_sessions):
    svc, other, model, pid = two_sessions
    model.text = "Symptom type: stress\nThe patient seems tired."
    model.during = lambda: other.edit_item("bob", pid, "reason 1", "Edited meanwhile", None)
    *_, done = svc.regenerate_all(USER, pid)
    stored = svc.get_draft(USER, pid)
    assert not done.ok and "could not be split" in done.message
    assert _texts(stored["reasons"]) == ["Edited meanwhile", "Sleeps badly."] and "seems tired" in stored["raw"]


def test_regenerate_item_follows_the_item_when_others_move(two_sessions):
    svc, other, model, pid = two_sessions
    model.text, model.during = "Wakes at 4 am.", lambda: other.delete_item("bob", pid, "reason 1")
    *_, done = svc.regenerate_item(USER, pid, "reason 2")
    stored = svc.get_draft(USER, pid)
    assert done.ok and "reason 2 regenerated (now reason 1)" in done.message
    assert _texts(stored["reasons"]) == ["Wakes at 4 am."]


def test_regenerate_item_keeps_an_edit_of_that_item(two_sessions):
    svc, other, model, pid = two_sessions
    model.text, model.during = "Model text.", lambda: other.edit_item("bob", pid, "advice 1", "Counselor text", None)
    *_, done = svc.regenerate_item(USER, pid, "advice 1")
    assert not done.ok and "your edit is kept" in done.message
    assert _texts(svc.get_draft(USER, pid)["advice"]) == ["Counselor text", "Regular meals."]


def test_concurrent_edits_from_two_sessions_all_land(two_sessions):
    svc, other, _model, pid = two_sessions

    def add(service, who):
        for i in range(12):
            service.add_item(who, pid, "advice", f"{who} {i}")

    errors = run_concurrently(add, ((svc, "alice"), (other, "bob")))
    assert not errors
    texts = _texts(svc.get_draft(USER, pid)["advice"])
    assert {f"{u} {i}" for u in ("alice", "bob") for i in range(12)} <= set(texts)


def test_legacy_draft_without_ids_merges(two_sessions):
    svc, other, model, pid = two_sessions
    legacy = {"question": "old", "symptom_type": {"text": "x", "comment": ""},
              "reasons": [{"text": "r1", "comment": ""}, {"text": "r2", "comment": ""}], "advice": [],
              "raw": "", "parse_ok": True}
    svc.store.save_draft(USER, pid, legacy)
    assert N.item_refs(svc.get_draft(USER, pid)) == ["symptom type", "reason 1", "reason 2"]
    model.text, model.during = REGEN, lambda: other.edit_item("bob", pid, "reason 2", "r2 edited", None)
    *_, done = svc.regenerate_all(USER, pid)
    assert done.ok and _texts(svc.get_draft(USER, pid)["reasons"])[-1] == "r2 edited"
    assert _texts(svc.get_draft(USER, pid)["reasons"]).count("r1") == 0


SECOND = "Symptom type: panic\nReasons:\n1. Crowded buses.\n2. Fear of fainting.\nAdvice:\n1. Slow breathing.\n"
SAID2 = "My heart races on the bus."


def _start_analysis(svc, pid, said=SAID2):
    """An analysis stepped through by hand, as the UI does: context line and first piece read."""
    updates = svc.stream_analysis(USER, pid, said)
    assert next(updates).message.startswith("Context:")
    assert not next(updates).final
    return updates


def test_analysis_keeps_a_draft_edited_while_it_runs_and_offers_the_new_one(two_sessions):
    svc, other, model, pid = two_sessions
    before = svc.get_draft(USER, pid)
    model.text = SECOND
    updates = _start_analysis(svc, pid)
    other.edit_item("bob", pid, "reason 1", "Lost the job in May", None)  # a second session, between pieces
    *_, done = updates
    stored = svc.get_draft(USER, pid)
    assert done.final and not done.ok and done.draft == stored
    assert "was edited" in done.message and "Use the other analysis" in done.message
    assert stored["draft_id"] == before["draft_id"]
    assert _texts(stored["reasons"]) == ["Lost the job in May", "Sleeps badly."]
    (waiting,) = stored["alternatives"]
    assert waiting["question"] == SAID2 and waiting["symptom_type"]["text"] == "panic"
    assert _texts(waiting["reasons"]) == ["Crowded buses.", "Fear of fainting."]
    shown = N.draft_markdown(stored)
    assert N.ALTERNATIVE_HEADING in shown and "Crowded buses." in shown and "Lost the job in May" in shown

    used = svc.use_alternative(USER, pid)  # the new analysis becomes the draft, the edited one waits
    assert used["question"] == SAID2 and _texts(used["advice"]) == ["Slow breathing."]
    assert _texts(used["alternatives"][0]["reasons"]) == ["Lost the job in May", "Sleeps badly."]
    back = svc.use_alternative(USER, pid)  # and back again: nothing is lost either way
    assert back["draft_id"] == before["draft_id"] and back["alternatives"][0]["question"] == SAID2
    assert not svc.dismiss_alternative(USER, pid)["alternatives"]
    with pytest.raises(N.InputProblem, match="no other analysis is waiting"):
        svc.use_alternative(USER, pid)


def test_analysis_without_concurrent_change_replaces_the_draft(two_sessions):
    svc, _other, model, pid = two_sessions
    before = svc.get_draft(USER, pid)
    model.text = SECOND
    *_, done = _start_analysis(svc, pid)
    stored = svc.get_draft(USER, pid)
    assert done.final and done.ok and done.message == "Draft ready: review, edit and save."
    assert stored["draft_id"] != before["draft_id"] and stored["question"] == SAID2
    assert _texts(stored["reasons"]) == ["Crowded buses.", "Fear of fainting."] and "alternatives" not in stored
    assert stored["version"] == before["version"] + 1


def test_analysis_keeps_a_draft_replaced_while_it_runs(two_sessions):
    svc, other, model, pid = two_sessions
    model.text = SECOND
    updates = _start_analysis(svc, pid)
    theirs = N.new_draft("Another visit", N.parse_analysis(FIRST))  # another session's analysis lands first
    other.store.save_draft("bob", pid, theirs)
    *_, done = updates
    stored = svc.get_draft(USER, pid)
    assert not done.ok and "was replaced by another one" in done.message
    assert stored["draft_id"] == theirs["draft_id"] and stored["question"] == "Another visit"
    assert stored["alternatives"][0]["question"] == SAID2


def test_analysis_keeps_a_draft_started_while_it_runs(two_sessions):
    svc, other, model, pid = two_sessions
    svc.discard_draft(USER, pid)
    model.text = SECOND
    updates = _start_analysis(svc, pid)
    other.add_item("bob", pid, "advice", "Call the GP")  # starts a draft of bob's
    *_, done = updates
    stored = svc.get_draft(USER, pid)
    assert not done.ok and "was started" in done.message
    assert _texts(stored["advice"]) == ["Call the GP"] and stored["alternatives"][0]["question"] == SAID2


def test_analysis_after_the_draft_was_saved_meanwhile_becomes_the_draft(two_sessions):
    svc, other, model, pid = two_sessions
    model.text = SECOND
    updates = _start_analysis(svc, pid)
    other.save_draft_as_note("bob", pid)
    *_, done = updates
    assert done.ok and "saved or discarded meanwhile" in done.message
    assert svc.get_draft(USER, pid)["question"] == SAID2
    assert svc.store.list_notes(USER, pid)[0]["reasons"] == ["Lost the job at the bakery.", "Sleeps badly."]


def test_regenerate_all_keeps_the_waiting_analysis(two_sessions):
    svc, other, model, pid = two_sessions
    model.text = SECOND
    updates = _start_analysis(svc, pid)
    other.edit_item("bob", pid, "advice 1", "Walk after lunch", None)
    list(updates)
    model.text = REGEN
    *_, done = svc.regenerate_all(USER, pid)
    assert done.ok and done.draft["symptom_type"]["text"] == "depressive episode"
    assert done.draft["alternatives"][0]["question"] == SAID2


def test_ui_shows_and_takes_the_waiting_analysis(two_sessions):
    """Through the UI's API: Analyze with an edit from another session meanwhile, then the buttons."""
    from gradio_client import Client

    from phyassist.app.ui import launch, shutdown

    svc, other, model, pid = two_sessions
    model.text, model.during = SECOND, lambda: other.edit_item("bob", pid, "reason 2", "Wakes at four", None)
    ui = launch(svc, port=0, block=False, users={})
    try:
        client = Client(ui.local_url, verbose=False)
        _stream, md, _pick, _text, status = client.predict(pid, SAID2, api_name="/do_analyze")
        assert "was edited" in status and N.ALTERNATIVE_HEADING in md and "Crowded buses." in md
        assert "Wakes at four" in md
        md, _pick, status = client.predict(pid, api_name="/do_use_alternative")
        assert "Now using the other analysis" in status and "**Counseling question:** " + SAID2 in md
        md, _pick, status = client.predict(pid, api_name="/do_dismiss_alternative")
        assert "dismissed" in status and N.ALTERNATIVE_HEADING not in md
        _md, _pick, status = client.predict(pid, api_name="/do_dismiss_alternative")
        assert status.startswith("⚠") and "no other analysis" in status
    finally:
        shutdown(ui)
    assert svc.get_draft(USER, pid)["question"] == SAID2
    assert not list((svc.store.data_dir / ".tmp").glob("gradio-*")), "the private Gradio cache outlived the UI"


@pytest.mark.parametrize("max_new", [24, 64, 160])
def test_format_guard_holds_even_a_random_model_to_the_note_format(tokenizer, max_new):
    """The embedded 135 M model rarely keeps the note format on its own (bench/app_parse.md); the
    guard writes each line's start, so even random weights give a draft that splits into items."""
    import torch
    from transformers import AutoModelForCausalLM

    from phyassist.app.assistant import ANALYSIS_PREFIX, SYSTEM, Generator, analysis_task, build_prompt
    from phyassist.models.registry import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-mixtral")).eval()
    gen = Generator(model, tokenizer, repetition_penalty=1.15)
    for said in ("I cannot sleep since I lost my job.", "My heart races on the bus.", "I drink every night."):
        prompt, _ = build_prompt(tokenizer, SYSTEM, analysis_task(said), {"name": "X", "age": "30"}, [], 0, 1800,
                                 ANALYSIS_PREFIX)
        text = ANALYSIS_PREFIX + gen.complete(prompt, max_new, guided=True)
        parsed = N.parse_analysis(text)
        assert parsed["ok"], text
        assert 1 <= len(parsed["reasons"]) <= 4 and 1 <= len(parsed["advice"]) <= 4
