"""Per-patient LoRA adapters: trained in the background on a patient's saved notes, sealed
(AES-256-GCM) at rest, marked as patient data so they are never published, and swapped on
the one loaded base model (``load_adapter`` / ``set_adapter``), not reloaded.

A patient's folder ``adapters/patient_<id>/`` holds ``PATIENT_DATA`` (a marker the publish stage
refuses) and one version folder ``v<n>`` per trained adapter, the store's record naming the current
one. A version folder holds ``adapter_config.json`` (hyper-parameters only, flagged
``"phyassist_patient_adapter": true``), the marker and ``adapter_model.safetensors.enc``, whose
associated data binds it to the patient, the version and the config's hash; the weights are
decrypted into memory to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phyassist.app.crypto import Cipher, DamagedRecord, KeyProblem
from phyassist.app.private import private_workdir

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
    """The patient's adapter folder; each trained adapter is a version folder ``v<n>`` in it."""
    return Path(data_dir) / "adapters" / f"patient_{int(patient_id)}"


def version_folder(data_dir: Path, patient_id: int, version: int) -> Path:
    return adapter_folder(data_dir, patient_id) / f"v{int(version)}"


def is_patient_adapter(folder: str | Path) -> bool:
    """True for any folder marked as patient data (marker file or config flag)."""
    folder = Path(folder)
    if (folder / MARKER).exists():
        return True
    cfg = folder / CONFIG
    return cfg.exists() and bool(json.loads(cfg.read_text(encoding="utf-8")).get(FLAG))


def adapter_context(patient_id: int, version: int, config_bytes: bytes) -> str:
    """Associated data of a sealed adapter: its patient, its version (an older adapter copied back
    does not open as the current one) and its config file's hash (the config is authenticated)."""
    digest = hashlib.sha256(config_bytes).hexdigest()
    return f"adapters:patient:{int(patient_id)}:version:{int(version)}:config:{digest}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def seal_weights(cfg: dict[str, Any], weights: bytes, data_dir: Path, cipher: Cipher, patient_id: int,
                 version: int) -> Path:
    """Encrypt adapter weights into the version folder ``v<version>`` (built aside, then renamed in
    one step). Sealing never touches the adapter in use: the store's record names the version
    that is current, so a crash before the record is written leaves the patient on their old
    adapter, and the start-up sweep removes the unrecorded folder."""
    root = adapter_folder(data_dir, patient_id)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (root / MARKER).exists():
        _write_private(root / MARKER, MARKER_TEXT.encode("utf-8"))
    config_bytes = (json.dumps(dict(cfg, **{FLAG: True}), indent=2) + "\n").encode("utf-8")
    tmp = root / f".v{int(version)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    _write_private(tmp / CONFIG, config_bytes)
    _write_private(tmp / MARKER, MARKER_TEXT.encode("utf-8"))
    _write_private(tmp / SEALED_WEIGHTS,
                   cipher.encrypt_bytes(weights, adapter_context(patient_id, version, config_bytes)))
    dst = version_folder(data_dir, patient_id, version)
    shutil.rmtree(dst, ignore_errors=True)  # an unrecorded folder of a job that crashed before its record
    tmp.rename(dst)
    return dst


def seal_adapter(src: Path, data_dir: Path, cipher: Cipher, patient_id: int, version: int) -> Path:
    """Encrypt a trained PEFT folder ``src`` as the patient's adapter ``version``."""
    cfg = json.loads((Path(src) / CONFIG).read_text(encoding="utf-8"))
    return seal_weights(cfg, (Path(src) / WEIGHTS).read_bytes(), data_dir, cipher, patient_id, version)


def open_sealed(folder: Path, cipher: Cipher, patient_id: int, version: int):
    """(LoraConfig, state dict) decrypted in memory; nothing plaintext touches the disk. A changed
    config, changed weights or another version's folder raise DamagedRecord."""
    from peft import LoraConfig
    from safetensors.torch import load as load_safetensors

    try:
        config_bytes = (folder / CONFIG).read_bytes()
        blob = (folder / SEALED_WEIGHTS).read_bytes()
    except OSError as exc:
        raise DamagedRecord(f"patient #{int(patient_id)}: adapter version {version} is missing from {folder} "
                            f"({type(exc).__name__}); retrain it or restore the folder") from None
    try:
        weights = cipher.decrypt_bytes(blob, adapter_context(patient_id, version, config_bytes))
    except KeyProblem:
        raise DamagedRecord(f"patient #{int(patient_id)}: adapter version {version} in {folder} does not open: "
                            "its weights or adapter_config.json were changed, or another adapter was copied "
                            "there; retrain it") from None
    cfg = json.loads(config_bytes)
    cfg.pop(FLAG, None)
    known = set(LoraConfig.__dataclass_fields__)
    peft_cfg = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k != "peft_type"})
    return peft_cfg, load_safetensors(weights)


def versions_on_disk(data_dir: Path, patient_id: int) -> list[int]:
    root = adapter_folder(data_dir, patient_id)
    if not root.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))


def prune_versions(data_dir: Path, patient_id: int, keep: int | None) -> list[str]:
    """Remove the patient's adapter folders other than version ``keep`` (older versions, unrecorded
    ones of a crashed job, half-built ``.v<n>.tmp``); returns what was removed."""
    root = adapter_folder(data_dir, patient_id)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if p.is_dir() and p.name != f"v{keep}" and re.fullmatch(r"\.?v\d+(\.tmp)?", p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def install_adapter(store, user: str, patient_id: int, src: Path, n_notes: int) -> Path:
    """Seal a trained PEFT folder as the patient's next adapter version and make it current: the
    store's record is the switch (one transaction), older versions are removed after it."""
    version = store.next_adapter_version(patient_id)
    folder = seal_adapter(src, store.data_dir, store.cipher, patient_id, version)
    store.record_adapter(user, patient_id, str(folder.relative_to(store.data_dir)), n_notes, version)
    prune_versions(store.data_dir, patient_id, keep=version)
    return folder


def latest_on_disk(data_dir: Path, patient_id: int) -> tuple[Path, int] | None:
    """The newest sealed version folder (for a bank without a store: tests, benchmarks)."""
    versions = [v for v in versions_on_disk(data_dir, patient_id)
                if (version_folder(data_dir, patient_id, v) / SEALED_WEIGHTS).exists()]
    return (version_folder(data_dir, patient_id, versions[-1]), versions[-1]) if versions else None


class AdapterBank:
    """Which adapter the shared model runs with; at most ``max_loaded`` patient adapters in memory."""

    def __init__(self, model, cipher: Cipher, data_dir: Path, *, max_loaded: int = 4,
                 locate: Callable[[int], tuple[Path, int] | None] | None = None, kit_adapter: str | None = None):
        """``locate(patient_id)``: (folder, version) of the patient's current adapter, or None (the
        service asks the store, which raises DamagedRecord for a record rolled back or removed);
        default: the newest sealed version on disk."""
        self.model = model
        self.cipher = cipher
        self.data_dir = Path(data_dir)
        self.max_loaded = max_loaded
        self.locate = locate or (lambda pid: latest_on_disk(self.data_dir, pid))
        self.versions: dict[str, int] = {}
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

    def _ensure(self, name: str, patient_id: int, where: tuple[Path, int]) -> None:
        folder, version = where
        if name in self.loaded and name not in self.stale and self.versions.get(name) == version:
            self.loaded.move_to_end(name)
            return
        if name in self.loaded:
            if self.active == name:
                self.active = None
            self.model.delete_adapter(name)
            del self.loaded[name]
        peft_cfg, state = open_sealed(folder, self.cipher, patient_id, version)
        self._inject(name, peft_cfg, state)
        self.model.eval()  # new LoRA modules start in training mode: their dropout would make outputs random
        self.loaded[name] = None
        self.versions[name] = version
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
            where = self.locate(int(patient_id)) if patient_id is not None else None
            if where is not None:
                name = f"patient_{int(patient_id)}"
                self._ensure(name, int(patient_id), where)
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


def train_patient_adapter(cfg, job: TrainJob, store, model=None, tokenizer=None) -> Path:
    """Train with the kit's trainer in a private working folder (0700 under the data folder; its
    checkpoints are plaintext while the job runs, and the folder goes when it ends or, after a
    crash, at the next start-up: :func:`phyassist.app.private.sweep_workdirs`), then seal the result
    as the patient's next adapter version. ``model``/``tokenizer``: a base to train on instead of
    loading ``cfg.model``."""
    from phyassist.train.trainer import train

    with private_workdir(store.data_dir, "train-") as work:
        adapter = train(cfg, train_records=job.records, output_dir=work / "run", model=model, tokenizer=tokenizer,
                        callbacks=[progress_callback(job.status)])
        return install_adapter(store, job.user, job.patient_id, adapter, len(job.records))
