"""Config section ``data``: sources, cleaning rules, formatting and splits.

Adding a data set is YAML only: a ``sources`` entry of ``kind: table`` naming the file and the
two columns that hold the question and the answer.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from phyassist.schema_base import Section

IMHI_TRAIN_SETS = ("DR", "dreaddit", "Irf", "MultiWD", "SAD")
IMHI_TEST_SETS = ("CAMS", "DR", "Irf", "MultiWD", "SAD", "dreaddit", "loneliness", "t-sid")


class SourceConfig(Section):
    name: str = Field(..., description="IMHI set (DR, dreaddit, Irf, MultiWD, SAD, ...), counsel-chat, or any label.")
    kind: Literal["imhi", "counsel_chat", "table"] = "imhi"
    variant: Literal["instruction", "complete"] = Field(
        "instruction", description="IMHI only: instruction_data (query/answer) or complete_data (post/question/response).")
    path: Optional[str] = Field(None, description="File; default: found under data.data_dir. Relative paths: "
                                                  "to data.data_dir, then to the repo.")
    split: Literal["train", "val", "test"] = "train"
    n_rows: Optional[int] = Field(None, gt=0, description="Seeded sample size after cleaning; None keeps all.")
    question_column: Optional[str] = Field(None, description="table only: column holding the question.")
    answer_column: Optional[str] = Field(None, description="table only: column holding the gold answer.")

    @model_validator(mode="after")
    def _table_needs_path(self):
        if self.kind == "table" and not self.path:
            raise ValueError(f"source {self.name!r}: kind 'table' needs a path (CSV, TSV, JSON or JSONL file)")
        if self.kind != "table" and (self.question_column or self.answer_column):
            raise ValueError(f"source {self.name!r}: question_column/answer_column apply to kind 'table' only")
        return self


class CleaningConfig(Section):
    max_chars: Optional[int] = Field(6000, gt=0, description="Drop rows whose question+answer exceed this.")
    max_tokens: Optional[int] = Field(1024, gt=0, description="Drop rows whose formatted text exceeds this "
                                                              "many tokens (the model's tokenizer).")
    drop_links: bool = Field(True, description="Drop rows containing URLs (http(s)://, www., domain/path).")
    fix_mojibake: bool = Field(True, description="Repair mojibake with ftfy; false: drop rows that have it.")
    dedup_exact: bool = Field(True, description="Drop repeats of the same normalised question+answer.")
    near_dup_threshold: Optional[float] = Field(
        0.9, gt=0, le=1, description="Drop rows whose word-shingle Jaccard similarity to a kept row is at "
                                     "least this (MinHash LSH + exact check); null: off.")
    drop_test_overlap: bool = Field(
        True, description="Drop training rows whose post/question also appears in a test set (leakage).")
    examples_per_rule: int = Field(3, ge=0, description="Removed rows shown per source and rule in the report.")


class DataConfig(Section):
    data_dir: Optional[str] = Field(None, description="Local copy of the sources; None: bundled sample.")
    download: bool = Field(False, description="Fetch missing files into data_dir (MentalLLaMA, counsel-chat).")
    mentalllama_url: str = Field("https://raw.githubusercontent.com/SteveKGYang/MentalLLaMA/main",
                                 description="Base URL of MentalLLaMA's repository files.")
    counsel_chat_url: str = Field(
        "https://raw.githubusercontent.com/nbertagnolli/counsel-chat/master/data/20200325_counsel_chat.csv",
        description="counsel-chat's CSV; the Hub data set nbertagnolli/counsel-chat is tried after it.")
    sources: list[SourceConfig] = Field(default_factory=list)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    system_prompt: Optional[str] = None
    fallback_split: Optional[Literal["val"]] = Field(
        "val", description="When a source's train split is missing, use this split (never test).")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    note_sections: bool = Field(False, description="Train on answers laid out as the app's note sections "
                                                   "(Analysis:/Advice:); the record's `answer` stays the gold.")
    check_leakage: bool = Field(True, description="Report train/test overlap against the IMHI test sets.")
    test_dir: Optional[str] = Field(None, description="IMHI test sets for the leakage check; None: "
                                                      "<data root>/MentalLLaMA/test_data/test_instruction.")

    @model_validator(mode="after")
    def _unique_source_names(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.sources: duplicate source name(s) {dup}; give each a distinct name")
        return self
