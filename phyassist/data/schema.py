"""Config section ``data``: sources, cleaning rules, formatting and splits."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from phyassist.schema_base import Section


class SourceConfig(Section):
    name: str = Field(..., description="IMHI set (DR, dreaddit, Irf, MultiWD, SAD, ...), counsel-chat, or any label.")
    kind: Literal["imhi", "counsel_chat", "table"] = "imhi"
    path: Optional[str] = Field(None, description="File or folder; default: found under data.data_dir.")
    split: Literal["train", "val", "test"] = "train"
    n_rows: Optional[int] = Field(None, gt=0, description="Seeded sample size; None keeps all.")
    question_column: Optional[str] = None
    answer_column: Optional[str] = None


class CleaningConfig(Section):
    max_chars: Optional[int] = Field(6000, gt=0)
    max_tokens: Optional[int] = Field(1024, gt=0)
    drop_links: bool = True
    fix_mojibake: bool = True
    dedup_exact: bool = True
    near_dup_threshold: Optional[float] = Field(0.9, gt=0, le=1)


class DataConfig(Section):
    data_dir: Optional[str] = Field(None, description="Local copy of the sources; None: bundled sample.")
    download: bool = False
    sources: list[SourceConfig] = Field(default_factory=list)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    system_prompt: Optional[str] = None
    fallback_split: Optional[Literal["val"]] = Field(
        "val", description="When a source's train split is missing, use this split (never test).")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    note_sections: bool = False
