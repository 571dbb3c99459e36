"""Test environment: offline, wandb offline, and skips for data or hardware that is absent."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from phyassist.paths import shared_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (real IMHI, counsel-chat, COVID-Dialogue copies) or skip."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data not present")
    return d


@pytest.fixture(scope="session")
def has_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return True


def run_concurrently(fn, calls) -> list[BaseException]:
    """``fn(*args)`` for each ``args`` in ``calls``, each in its own thread, all started before any
    is joined; returns the exceptions they raised (tests of concurrent writers expect none)."""
    import threading

    errors: list[BaseException] = []

    def guarded(*args):
        try:
            fn(*args)
        except Exception as exc:  # pragma: no cover - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
