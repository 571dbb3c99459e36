"""What a run logs besides loss: throughput and GPU state (meter), and the wandb run setup."""

from __future__ import annotations

import os
import time
from pathlib import Path

from phyassist.io import atomic_write_text


class SystemMeter:
    """Tokens/s since the last sample, peak GPU memory and GPU power, as log entries."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._t = time.perf_counter()
        self._tokens = 0

    def sample(self, state) -> dict:
        if not self.enabled:
            return {}
        now, tokens = time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0)
        out = {}
        if tokens > self._tokens and now > self._t:
            out["tokens_per_s"] = round((tokens - self._tokens) / (now - self._t), 1)
        self._t, self._tokens = now, tokens
        out.update(gpu_stats())
        return out


def gpu_stats() -> dict:
    """Peak allocated memory (GiB) and power draw (W) of every visible GPU; {} without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {}
    for i in range(torch.cuda.device_count()):
        out[f"gpu{i}_peak_gib"] = round(torch.cuda.max_memory_allocated(i) / 2**30, 3)
        try:
            out[f"gpu{i}_power_w"] = round(torch.cuda.power_draw(i) / 1000.0, 1)
        except Exception:  # NVML absent: memory only
            pass
    return out


def wandb_run_id(out: Path) -> str:
    """A run id kept in the output folder, so a resumed run continues the same wandb run."""
    import uuid

    path = out / "wandb_run_id.txt"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    rid = uuid.uuid4().hex[:12]
    atomic_write_text(path, rid)
    return rid


def init_wandb(cfg, out: Path):
    """Start (or resume) the wandb run named in the config; the offline run folder stays in
    ``<out>/wandb`` for ``wandb sync``. Returns the run, or None when disabled."""
    w = cfg.wandb
    os.environ["WANDB_MODE"] = w.mode
    if w.mode == "disabled":
        return None
    import wandb


    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=w.project, entity=w.entity, name=w.run_name or cfg.name, tags=list(w.tags),
                      config=cfg.model_dump(mode="json"), mode=w.mode, dir=str(out),
                      id=wandb_run_id(out), resume="allow")


def parallel_layout(model) -> dict:
    """How the prepared model is spread: parameters sharded by FSDP (DTensor) vs whole, and the 4-bit
    weights among them (by owning module: FSDP turns ``Params4bit`` into plain DTensors), as element
    counts of this process' pieces. Proves a launch did what it says."""
    four = {id(m.weight) for m in model.modules() if type(m).__name__ in ("Linear4bit", "Embedding4bit")}
    out = {"parameters": 0, "sharded": 0, "params_4bit": 0, "sharded_4bit": 0, "local_elements": 0,
           "full_elements": 0, "storage_4bit": set()}
    for p in model.parameters():
        sharded = type(p).__name__ == "DTensor"
        is4 = id(p) in four
        local = p.to_local() if sharded else p
        out["parameters"] += 1
        out["sharded"] += sharded
        out["params_4bit"] += is4
        out["sharded_4bit"] += sharded and is4
        out["local_elements"] += local.numel()
        out["full_elements"] += p.numel()
        if is4:
            out["storage_4bit"].add(str(p.dtype).removeprefix("torch."))
    out["storage_4bit"] = sorted(out["storage_4bit"])
    return out


def layout_callback(out: Path):
    """A TrainerCallback that records the layout once the trainer has wrapped the model (DDP/FSDP
    happen inside ``train()``): printed by rank 0 and written to ``<out>/parallel.json``."""
    from transformers import TrainerCallback

    from phyassist.io import atomic_write_json
    from phyassist.models.loading import under_fsdp

    class LayoutReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            import torch.distributed as dist

            if model is None:
                return
            lay = parallel_layout(model)
            lay["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            lay["fsdp"] = under_fsdp()
            if state.is_world_process_zero:
                atomic_write_json(out / "parallel.json", lay)
                if lay["world_size"] > 1 or lay["fsdp"]:
                    print(f"[train] {lay['world_size']} processes, {'FSDP' if lay['fsdp'] else 'data parallel'}: "
                          f"{lay['sharded']} of {lay['parameters']} parameters sharded "
                          f"({lay['sharded_4bit']} of {lay['params_4bit']} 4-bit, storage {lay['storage_4bit']}); "
                          f"this process holds {lay['local_elements']:,} of {lay['full_elements']:,} elements",
                          flush=True)

    return LayoutReport()


# ---------------------------------------------------------------- model cards of checkpoints

_NONE_LINK = "[None](https://huggingface.co/None)"


def name_base_model(folder: str | Path, model_name: str) -> list[Path]:
    """Name the base model in the cards TRL and PEFT write into ``folder`` (a checkpoint, the
    checkpoints folder, the adapter).

    The kit loads its models from a local cache folder, so TRL writes "fine-tuned version of
    [None]" and PEFT ``base_model: /home/…/.cache/…``. Both become the registry's Hub id (or the
    configured name when the model has none). Returns the cards changed."""
    import re

    from phyassist.models.registry import hub_id_of

    hub = hub_id_of(model_name)
    link = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{model_name}`"
    changed = []
    for card in sorted(Path(folder).glob("README.md")):
        text = card.read_text(encoding="utf-8")
        new = text.replace(_NONE_LINK, link)
        if hub:
            head, sep, body = new.partition("\n---\n") if new.startswith("---\n") else ("", "", new)
            if sep:
                head = re.sub(r"(?m)^base_model: (/|~|\.).*$", f"base_model: {hub}", head)
                head = re.sub(r"(?m)^- base_model:adapter:(/|~|\.).*$", f"- base_model:adapter:{hub}", head)
                new = head + sep + body
        if new != text:
            atomic_write_text(card, new)
            changed.append(card)
    return changed


def card_callback(model_name: str):
    """A TrainerCallback that names the base model in the cards of each saved checkpoint."""
    from transformers import TrainerCallback

    class CardNamer(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                name_base_model(args.output_dir, model_name)
                name_base_model(Path(args.output_dir) / f"checkpoint-{state.global_step}", model_name)

    return CardNamer()


# ---------------------------------------------------------------- progress inside a notebook

def step_line(state, logs: dict) -> str:
    """One line per logging step: ``[train] step 10/30 · loss 3.350 · lr 2.0e-04 · 2.5 tokens/s``."""
    parts = [f"[train] step {state.global_step}/{state.max_steps}"]
    for key, fmt in (("loss", "loss {:.3f}"), ("eval_loss", "eval loss {:.3f}"), ("learning_rate", "lr {:.1e}"),
                     ("tokens_per_s", "{:.1f} tokens/s")):
        if isinstance(logs.get(key), (int, float)):
            parts.append(fmt.format(logs[key]))
    return " · ".join(parts)


def progress_callback():
    """Prints :func:`step_line` when the Trainer runs in a notebook kernel: there transformers draws
    its progress as an HTML table that ``phyassist run`` (papermill) cannot show in a terminal.
    In a terminal the Trainer prints its own bar and log lines, so this prints nothing."""
    from transformers import TrainerCallback
    from transformers.utils import is_in_notebook

    class StepPrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and is_in_notebook():
                print(step_line(state, logs), flush=True)

    return StepPrinter()
