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


def run_in_triton_interpreter(checks: str) -> None:
    """Run ``checks`` (Python statements; ``k`` is the kit's kernel module) in a subprocess under
    Triton's CPU interpreter: TRITON_INTERPRET is read when Triton is imported."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests'); "  # test modules import helpers from this conftest
            "import torch, phyassist.models.mixtral4bit.kernels as k; assert k.use_triton(torch.zeros(1)); "
            f"{checks}; print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def adapters_like_trained(model, std: float) -> None:
    """Non-zero LoRA weights (normal, ``std``), so that adapters change the output, and decisive routers (the
    router weights x20), as trained ones are: random routers leave near-tied top-2 choices that a sum in another
    order flips."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)
            elif ".mlp.gate." in n and n.endswith("weight"):
                p.mul_(20)
