"""Talking to the Hugging Face Hub: token, network, ownership, repo creation and upload.

Every failure becomes a PublishError that says what to do, and nothing is uploaded before the
token, the network and the repo's namespace have been checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from phyassist.publish.package import PublishError

TOKEN_HELP = ("set the HF_TOKEN environment variable to a write token "
              "(https://huggingface.co/settings/tokens), or log in with `hf auth login` or, "
              "in a notebook, `from huggingface_hub import notebook_login; notebook_login()`")


def get_token() -> str:
    """HF_TOKEN from the environment, else the token saved by notebook_login / `hf auth login`."""
    from huggingface_hub import get_token as saved_token

    token = os.environ.get("HF_TOKEN") or saved_token()
    if not token:
        raise PublishError(f"no Hugging Face token: {TOKEN_HELP}")
    return token


def _network_error(exc: BaseException) -> bool:
    """True for failures to reach the Hub at all (as opposed to an HTTP answer)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return True
    if isinstance(exc, HfHubHTTPError):
        return False
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TransportError", "NetworkError",
                         "TimeoutException", "ConnectionError", "TimeoutError"})


def check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE=1 is set: the Hub cannot be reached. Unset it to publish "
                           "(`HF_HUB_OFFLINE=0 python -m phyassist publish ...`) or use --dry-run")


def call_hub(what: str, fn, *args, **kwargs):
    """Run one Hub call; turn network and HTTP failures into PublishError naming the step."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except PublishError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised with context
        if _network_error(exc):
            raise PublishError(f"no network: cannot reach the Hugging Face Hub ({what}: {exc}). "
                               "Check the connection, proxy (HTTPS_PROXY) and HF_ENDPOINT") from None
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 401:
                raise PublishError(f"the Hub refused the token ({what}): it is invalid or expired; "
                                   f"{TOKEN_HELP}") from None
            if status == 403:
                raise PublishError(f"the Hub refused {what}: the token has no write access to this "
                                   "namespace (use a write token, or a repo in your own namespace)") from None
            raise PublishError(f"Hub error during {what}: {exc}") from None
        raise


def namespaces(who: dict) -> set[str]:
    """The user's name and the organizations the token may write to."""
    names = {who.get("name")} | {o.get("name") for o in who.get("orgs", []) or []}
    return {n for n in names if n}


def resolve_repo_id(repo_id: str | None, default_name: str, who: dict) -> str:
    """``owner/name`` for the upload; refuses a namespace the token's user does not belong to."""
    user = who.get("name")
    if not repo_id:
        repo_id = f"{user}/{default_name}"
    elif "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    owner = repo_id.split("/", 1)[0]
    if owner not in namespaces(who):
        raise PublishError(
            f"repo {repo_id} belongs to '{owner}', but the token is {user!r} "
            f"(member of: {', '.join(sorted(namespaces(who) - {user})) or 'no organizations'}); "
            "publish under your own namespace (publish.repo_id=<you>/<name>) or use a token of that owner")
    return repo_id


def validate_online(card_text: str) -> None:
    """The Hub's own metadata check (POST /api/validate-yaml); raises PublishError on rejection."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(card_text).validate()
    except ValueError as exc:
        raise PublishError(f"the Hub rejected the model card metadata: {exc}") from None


@dataclass
class HubTarget:
    """A checked destination: the API client, the token and a repo id in the token's namespaces."""

    api: object
    token: str
    repo_id: str


def connect(repo_id: str | None, default_name: str, api=None) -> HubTarget:
    """Token, network and ownership checks, before anything is built or sent."""
    from huggingface_hub import HfApi

    check_online()
    token = get_token()
    api = api or HfApi(token=token)
    who = call_hub("checking the token (whoami)", api.whoami, token=token)
    return HubTarget(api, token, resolve_repo_id(repo_id, default_name, who))


def upload(target: HubTarget, folder: Path, *, private: bool, commit_message: str) -> dict:
    """Validate the card with the Hub, create (or reuse) the repo and upload ``folder`` in one commit."""
    api, token, repo_id = target.api, target.token, target.repo_id
    call_hub("validating the model card", validate_online, (folder / "README.md").read_text(encoding="utf-8"))
    repo = call_hub(f"creating {repo_id}", api.create_repo, repo_id, token=token, private=private,
                    repo_type="model", exist_ok=True)
    commit = call_hub(f"uploading to {repo_id}", api.upload_folder, repo_id=repo_id, folder_path=str(folder),
                      commit_message=commit_message, token=token, repo_type="model")
    url = str(getattr(repo, "url", "") or f"https://huggingface.co/{repo_id}")
    return {"repo_id": repo_id, "url": url, "commit_url": getattr(commit, "commit_url", None),
            "private": private}
