"""What a command prints: the kit's own lines and progress bars, without the third-party notices
that say nothing about the run (``--verbose`` keeps everything).

The notices filtered are listed in :data:`NOISE`, each with where it comes from, so that a new
one is added here once instead of being silenced in every stage.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from typing import Iterator, TextIO

# (pattern, where it comes from): whole lines matching are dropped from normal output.
NOISE: list[tuple[re.Pattern, str]] = [(re.compile(p), why) for p, why in (
    (r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes 0.50 on CPUs with AVX512-BF16 when the optional `kernels` package is absent"),
    (r"^wandb: ", "wandb's banner (offline mode, run folder, `wandb sync` hint)"),
    (r"^\[INFO\] Running in WANDB offline mode", "transformers' wandb integration, on import"),
    (r"^\[IPKernelApp\] WARNING \| Kernel is running over TCP without encryption",
     "ipykernel: a local notebook kernel over the loopback interface"),
    (r"IProgress not found\. Please update jupyter and ipywidgets", "tqdm in a kernel without ipywidgets"),
)]
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


def is_noise(line: str) -> bool:
    return any(p.search(line) for p, _ in NOISE)


class NoiseFilter(io.TextIOBase):
    """A text stream that passes everything to ``target`` except whole lines that are noise.

    Text is held back only until its line ends; a progress bar redrawn with ``\\r`` passes at once,
    so bars stay live."""

    def __init__(self, target: TextIO):
        self.target = target
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        out = "".join(line + "\n" for line in lines if not is_noise(line))
        if "\r" in self._pending:  # a bar being redrawn: show what is drawn so far
            head, _, self._pending = self._pending.rpartition("\r")
            if not is_noise(head):
                out += head + "\r"
        if out:
            self.target.write(out)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_line(self) -> None:
        """Write what is held back (a last line without its newline)."""
        if self._pending and not is_noise(self._pending):
            self.target.write(self._pending)
        self._pending = ""
        self.flush()

    # what callers ask of sys.stdout/sys.stderr
    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


@contextlib.contextmanager
def quiet_output(verbose: bool = False) -> Iterator[None]:
    """Filter :data:`NOISE` from this process' stdout and stderr (and ask wandb and the loggers
    in :data:`QUIET_LOGGERS` to stay quiet) for the duration; ``verbose`` changes nothing."""
    if verbose:
        yield
        return
    os.environ.setdefault("WANDB_SILENT", "true")  # inherited by notebook kernels too
    levels = {}
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(level)
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = NoiseFilter(old[0]), NoiseFilter(old[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, NoiseFilter):
                stream.close_line()
        sys.stdout, sys.stderr = old
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
