"""Per-patient LoRA adapters: trained in the background on a patient's saved notes, sealed
(AES-256-GCM) at rest, marked as patient data so they are never published, and swapped on
the one loaded base model (``load_adapter`` / ``set_adapter``), not reloaded.

A sealed adapter folder holds ``adapter_config.json`` (hyper-parameters only, flagged
``"phyassist_patient_adapter": true``), ``PATIENT_DATA`` (a marker the publish stage refuses)
and ``adapter_model.safetensors.enc``; the weights are decrypted into memory to load.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phyassist.app.crypto import Cipher

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
SEALED_WEIGHTS = WEIGHTS + ".enc"
CONFIG = "adapter_config.json"
MARKER = "PATIENT_DATA"
FLAG = "phyassist_patient_adapter"
MARKER_TEXT = ("This adapter was trained on confidential patient notes in the PhyAssist app. Its weights are\n"
               "encrypted and it must never be published or shared (the publish stage refuses it).\n")


class AdapterLimit(ValueError):
    """Training refused by a configured limit (adapter count, notes)."""


def adapter_folder(data_dir: Path, patient_id: int) -> Path:
    return Path(data_dir) / "adapters" / f"patient_{int(patient_id)}"


def is_patient_adapter(folder: str | Path) -> bool:
    """True for any folder marked as patient data (marker file or config flag)."""
    folder = Path(folder)
    if (folder / MARKER).exists():
        return True
    cfg = folder / CONFIG
    return cfg.exists() and bool(json.loads(cfg.read_text(encoding="utf-8")).get(FLAG))


def _context(patient_id: int) -> str:
    return f"adapter:{int(patient_id)}"


def seal_adapter(src: Path, dst: Path, cipher: Cipher, patient_id: int) -> Path:
    """Encrypt a trained PEFT folder into ``dst`` (atomically replacing an older one)."""
    cfg = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    cfg[FLAG] = True
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    (tmp / SEALED_WEIGHTS).write_bytes(cipher.encrypt_bytes((src / WEIGHTS).read_bytes(), _context(patient_id)))
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def open_sealed(folder: Path, cipher: Cipher, patient_id: int):
    """(LoraConfig, state dict) decrypted in memory; nothing plaintext touches the disk."""
    from peft import LoraConfig
    from safetensors.torch import load as load_safetensors

    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    cfg.pop(FLAG, None)
    known = set(LoraConfig.__dataclass_fields__)
    peft_cfg = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k != "peft_type"})
    weights = cipher.decrypt_bytes((folder / SEALED_WEIGHTS).read_bytes(), _context(patient_id))
    return peft_cfg, load_safetensors(weights)


class AdapterBank:
    """Which adapter the shared model runs with; at most ``max_loaded`` patient adapters in memory."""

    def __init__(self, model, cipher: Cipher, data_dir: Path, *, max_loaded: int = 4,
                 has_adapter: Callable[[int], bool] | None = None, kit_adapter: str | None = None):
        self.model = model
        self.cipher = cipher
        self.data_dir = Path(data_dir)
        self.max_loaded = max_loaded
        self.has_adapter = has_adapter or (lambda pid: (adapter_folder(self.data_dir, pid) / SEALED_WEIGHTS).exists())
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.stale: set[str] = set()
        self.active: str | None = None
        self.kit = None
        self.last_switch_s = 0.0
        self._lock = threading.Lock()
        if kit_adapter:
            self._load_kit(Path(kit_adapter).expanduser())

    def _load_kit(self, folder: Path) -> None:
        if not (folder / CONFIG).exists():
            raise FileNotFoundError(f"{folder}: app.adapter has no {CONFIG} (not a PEFT adapter folder)")
        self.model.load_adapter(str(folder), adapter_name="kit")
        self.model.eval()  # new LoRA modules start in training mode: their dropout would make outputs random
        self.kit = "kit"

    def forget(self, patient_id: int) -> None:
        """A retrained adapter: reload it on next use."""
        with self._lock:
            self.stale.add(f"patient_{int(patient_id)}")

    def _evict(self) -> None:
        while len(self.loaded) > self.max_loaded:
            name, _ = self.loaded.popitem(last=False)
            if name != self.active:
                self.model.delete_adapter(name)

    def _ensure(self, name: str, patient_id: int) -> None:
        if name in self.loaded and name not in self.stale:
            self.loaded.move_to_end(name)
            return
        if name in self.loaded:
            if self.active == name:
                self.active = None
            self.model.delete_adapter(name)
            del self.loaded[name]
        peft_cfg, state = open_sealed(adapter_folder(self.data_dir, patient_id), self.cipher, patient_id)
        self._inject(name, peft_cfg, state)
        self.model.eval()  # new LoRA modules start in training mode: their dropout would make outputs random
        self.loaded[name] = None
        self.stale.discard(name)
        self._evict()

    def _inject(self, name: str, peft_cfg, state: dict) -> None:
        """Add an adapter from an in-memory state dict through PEFT directly: transformers'
        ``load_adapter(adapter_state_dict=...)`` (5.23) writes a second in-memory adapter's weights
        under the first one's name. The model keeps transformers' adapter bookkeeping, so
        ``set_adapter``/``disable_adapters``/``delete_adapter`` work as usual."""
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        inject_adapter_in_model(peft_cfg, self.model, adapter_name=name)
        if not getattr(self.model, "_hf_peft_config_loaded", False) or not hasattr(self.model, "peft_config"):
            self.model.peft_config = {}
            self.model._hf_peft_config_loaded = True
        self.model.peft_config[name] = peft_cfg
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        result = set_peft_model_state_dict(self.model, state, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k]
        if missing:
            raise RuntimeError(f"adapter {name}: {len(missing)} weights did not load (e.g. {missing[0]})")

    def activate(self, patient_id: int | None) -> str:
        """Switch the model to the patient's adapter, else the kit adapter, else the base model."""
        t0 = time.perf_counter()
        with self._lock:
            name = None
            if patient_id is not None and self.has_adapter(int(patient_id)):
                name = f"patient_{int(patient_id)}"
                self._ensure(name, int(patient_id))
            elif self.kit:
                name = self.kit
            if name != self.active:
                if name is None:
                    self.model.disable_adapters()
                else:
                    if self.active is None:
                        self.model.enable_adapters()
                    self.model.set_adapter(name)
                self.active = name
        self.last_switch_s = time.perf_counter() - t0
        return describe(name)


def describe(name: str | None) -> str:
    if name is None:
        return "base model"
    if name == "kit":
        return "kit fine-tuned adapter"
    return f"patient adapter #{name.split('_', 1)[1]}"


# --- background training --------------------------------------------------------------------
@dataclass
class TrainStatus:
    state: str = "idle"  # idle | queued | running | done | failed
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    message: str = ""
    started: float = 0.0
    finished: float = 0.0
    loop_s: float = 0.0  # the optimizer steps alone (trainer.train), without loading and sealing
    base_s: float = 0.0  # getting the job's base model (a copy of the resident base: milliseconds)

    def text(self) -> str:
        if self.state == "running":
            pct = 100 * self.step / max(1, self.max_steps)
            loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
            return f"training: step {self.step}/{self.max_steps} ({pct:.0f}%){loss}"
        if self.state == "done":
            return f"adapter ready: {self.message} ({self.finished - self.started:.0f} s)"
        if self.state == "failed":
            return f"training failed: {self.message}"
        if self.state == "queued":
            return f"queued: {self.message}"
        return self.message or "no training started"


def progress_callback(status: TrainStatus):
    """A transformers TrainerCallback that mirrors step and loss into ``status``."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            status.state, status.max_steps = "running", state.max_steps
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            status.loop_s = time.perf_counter() - self.t0

        def on_step_end(self, args, state, control, **kw):
            status.step = state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                status.loss = float(logs["loss"])

    return _Progress()


@dataclass
class TrainJob:
    patient_id: int
    user: str
    records: list[dict[str, Any]]
    status: TrainStatus = field(default_factory=TrainStatus)


class TrainQueue:
    """One background worker trains patient adapters one after another; the UI keeps serving."""

    def __init__(self, run_job: Callable[[TrainJob], str]):
        self.run_job = run_job
        self.jobs: dict[int, TrainJob] = {}
        self._q: queue.Queue[TrainJob] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="phyassist-train", daemon=True)
        self._worker.start()

    def submit(self, job: TrainJob) -> TrainStatus:
        current = self.jobs.get(job.patient_id)
        if current and current.status.state in ("queued", "running"):
            return current.status
        job.status.state, job.status.message = "queued", f"{len(job.records)} note(s)"
        self.jobs[job.patient_id] = job
        self._q.put(job)
        return job.status

    def status(self, patient_id: int) -> TrainStatus:
        job = self.jobs.get(int(patient_id))
        return job.status if job else TrainStatus()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            job.status.started = time.time()
            job.status.state = "running"
            try:
                job.status.message = self.run_job(job)
                job.status.state = "done"
            except Exception as exc:  # shown to the counselor; text holds no patient data
                log.exception("patient adapter training failed for patient #%s", job.patient_id)
                job.status.state, job.status.message = "failed", f"{type(exc).__name__}: {exc}"
            job.status.finished = time.time()


def train_patient_adapter(cfg, job: TrainJob, cipher: Cipher, data_dir: Path, model=None, tokenizer=None) -> Path:
    """Train with the kit's trainer in a private temp folder, seal the result, wipe the plaintext.
    ``model``/``tokenizer``: a base to train on instead of loading ``cfg.model``."""
    from phyassist.train.trainer import train

    tmp_root = Path(data_dir) / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix="train-", dir=tmp_root))
    try:
        adapter = train(cfg, train_records=job.records, output_dir=work, model=model, tokenizer=tokenizer,
                        callbacks=[progress_callback(job.status)])
        return seal_adapter(adapter, adapter_folder(data_dir, job.patient_id), cipher, job.patient_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
