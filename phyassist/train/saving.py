"""Writing the final adapter: atomically, by the main process, with the run's metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

from phyassist.io import atomic_write_json
from phyassist.models.inference import ADAPTER_META, model_identity


def save_adapter(trainer, tokenizer, adapter_dir: Path, cfg) -> Path:
    """Write the final adapter atomically: into a temp folder, then renamed over the old one.
    Under ``accelerate launch`` every process takes part (FSDP gathers the sharded LoRA weights)
    and only the main one writes."""
    from phyassist.train.callbacks import name_base_model

    acc, main = trainer.accelerator, trainer.args.should_save
    if trainer.is_fsdp_enabled:  # one full adapter file, not a folder of shards
        acc.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    trainer.save_model(str(tmp))  # PEFT model: the adapter only (and the tokenizer)
    if not main:
        acc.wait_for_everyone()
        return adapter_dir
    (tmp / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(tmp))
    name_base_model(tmp, cfg.model.name)  # PEFT's card names the local cache folder, not the base model
    st = trainer.state
    atomic_write_json(tmp / ADAPTER_META, {"base_model": model_identity(cfg.model), "lora": cfg.train.lora.model_dump(),
                                       "global_step": st.global_step,
                                       "best_checkpoint": st.best_model_checkpoint and Path(st.best_model_checkpoint).name,
                                       "best_metric": st.best_metric,
                                       "weights": "best" if trainer.args.load_best_model_at_end else "final"})
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    acc.wait_for_everyone()
    return adapter_dir
