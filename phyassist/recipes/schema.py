"""Config section ``recipe``: the template recipes that carry the kit to other tasks.

``soulchat`` (recipe A) fine-tunes on multi-turn counseling dialogues and compares base vs
fine-tuned; ``covid`` (recipe B) chains SFT -> reward model -> RL -> prediction on doctor-patient
dialogues. Every data location and hyper-parameter is here, so a student edits YAML only.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from phyassist.schema_base import Section


class DialogueDataConfig(Section):
    """Where a recipe's dialogues come from and how they are split."""

    path: Optional[str] = Field(None, description="Local file or folder; None: the bundled sample "
                                "in data/sample/recipes/.")
    download: bool = Field(False, description="Fetch from `source` into `path` (or the cache) first.")
    source: Optional[str] = Field(None, description="Download id/URL (ModelScope dataset id, GitHub repo).")
    files: dict[str, Optional[str]] = Field(default_factory=dict, description="split -> file name inside `path`; "
                                            "null drops a split a base config lists (configs merge key by key).")
    format: Literal["auto", "messages", "sharegpt", "instruction", "prefixed"] = Field(
        "auto", description="messages: {messages:[{role,content}]}; sharegpt: {conversations:[{from,value}]}; "
        "instruction: {instruction,input,output}; prefixed: lists of 'speaker：text' utterances.")
    user_prefix: str = Field("病人：", description="prefixed format: the user's speaker tag.")
    assistant_prefix: str = Field("医生：", description="prefixed format: the assistant's speaker tag.")
    unit: Literal["conversation", "turn"] = Field(
        "conversation", description="conversation: one record per dialogue (loss on every assistant turn); "
        "turn: one record per assistant turn with the earlier turns as history.")
    system_prompt: Optional[str] = None
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the train dialogues held out (whole "
                                "dialogues) for validation.")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the train dialogues held out as test "
                                 "when no test file.")
    max_samples: Optional[int] = Field(None, gt=0, description="Seeded cap per split (None: all).")
    max_history_turns: Optional[int] = Field(None, gt=0, description="Keep at most this many earlier "
                                             "turns as history (None: all).")
    min_response_chars: int = Field(1, ge=0, description="Drop samples whose answer is shorter.")
    max_chars: Optional[int] = Field(None, gt=0, description="Drop samples whose prompt+answer is longer.")


CONSTRUCTION_NAMES = ("other_patient", "truncated", "off_topic_tail", "spliced", "sft_sample")
DEFAULT_CONSTRUCTIONS = ("other_patient", "truncated", "off_topic_tail", "spliced")  # need no model


class SftSampleConfig(Section):
    """The ``sft_sample`` construction: the SFT model's own reply to the prompt as ``rejected``,
    generated in the reward step (cached in ``<out>/preference/sft_samples.jsonl``)."""

    max_new_tokens: Optional[int] = Field(None, gt=0, description="None: recipe.predict.max_new_tokens.")
    batch_size: Optional[int] = Field(None, gt=0, description="Prompts generated at once; None: "
                                      "recipe.predict.batch_size.")
    temperature: float = Field(0.0, ge=0, description="0: greedy (the policy's most likely reply); > 0: "
                               "sampled at this temperature (seeded), as RL samples.")


class PreferenceDataConfig(Section):
    """Preference pairs (prompt / chosen / rejected) for the reward model: read from a file, or built
    from the recipe's own dialogues (``source: dialogues``; :mod:`phyassist.recipes.pairs`)."""

    source: Literal["file", "dialogues"] = Field(
        "file", description="file: pairs from `path` (or `url`); dialogues: built from the data step's splits, "
        "the real reply as chosen against a constructed rejected one (docs/recipes.md), no download.")
    path: Optional[str] = Field(None, description="JSON/JSONL file; None: the bundled synthetic sample.")
    download: bool = False
    url: str = Field("https://raw.githubusercontent.com/hiyouga/ChatGLM-Efficient-Tuning/main/data/"
                     "comparison_gpt4_data_zh.json", description="comparison_gpt4_zh, as the case study used.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="source file: share held out for validation "
                                "(source dialogues uses the data step's val split).")
    max_samples: Optional[int] = Field(None, gt=0, description="Seeded cap on training pairs.")
    constructions: list[Literal[CONSTRUCTION_NAMES]] = Field(
        default_factory=lambda: list(DEFAULT_CONSTRUCTIONS), min_length=1,
        description="source dialogues: how rejected replies are made (assigned round-robin over the samples); "
        "sft_sample (not by default) generates the SFT model's reply in the reward step.")
    sft_sample: SftSampleConfig = Field(default_factory=SftSampleConfig)
    pairs_per_sample: int = Field(1, gt=0, description="source dialogues: pairs per reply, each with another "
                                  "construction (at most the number of constructions).")
    length_tolerance: float = Field(0.2, gt=0, lt=1, description="other_patient/spliced/off_topic_tail: the "
                                    "donor reply's length within this share of the real reply's.")
    truncate_range: tuple[float, float] = Field((0.3, 0.7), description="truncated: keep this share of the "
                                                "reply (uniform in the range).")
    min_reply_chars: int = Field(8, ge=2, description="source dialogues: shorter replies make no pair "
                                 "(a cut of a two-character reply teaches nothing).")
    max_prompt_chars: Optional[int] = Field(None, gt=0, description="Drop pairs with a longer prompt "
                                            "(the reward trainer drops pairs over reward.max_length tokens).")
    max_eval_pairs: Optional[int] = Field(None, gt=0, description="Seeded cap on validation pairs "
                                          "(evaluated during reward training).")
    max_held_out_pairs: Optional[int] = Field(None, gt=0, description="Seeded cap on the held-out pairs the "
                                              "reward model's accuracy is measured on (None: all).")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.truncate_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"truncate_range: need 0 < low <= high < 1, got {list(self.truncate_range)}")
        if self.pairs_per_sample > len(self.constructions):
            raise ValueError(f"pairs_per_sample: {self.pairs_per_sample} is more than the "
                             f"{len(self.constructions)} constructions")
        if len(set(self.constructions)) != len(self.constructions):
            raise ValueError(f"constructions: listed twice: {self.constructions}")
        return self


class LoraSpec(Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class RewardConfig(Section):
    """Reward model: the base with a LoRA adapter and a scalar head, trained by TRL's RewardTrainer."""

    model: Optional[str] = Field(None, description="Base of the reward model; None: model.name.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(1e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0, description="Pairs scored at once (validation, held-out "
                                            "accuracy, and the predict step's reward scores).")
    gradient_accumulation_steps: int = Field(4, gt=0)
    lr_scheduler_type: str = "cosine"
    max_length: int = Field(1024, gt=0, description="Pairs with a longer prompt + reply (tokens) are dropped "
                            "by the trainer.")
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0)


class RLConfig(Section):
    """RL on the SFT model: TRL's RLOO with a fresh LoRA adapter, KL penalty to the SFT reference."""

    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(1e-5, gt=0)
    beta: float = Field(0.05, ge=0, description="KL coefficient (penalty to the SFT reference in the reward).")
    num_generations: int = Field(4, ge=2, description="Completions per prompt (leave-one-out baseline).")
    per_device_train_batch_size: int = Field(4, gt=0, description="Completions per device step "
                                             "(a multiple of num_generations).")
    gradient_accumulation_steps: int = Field(1, gt=0)
    steps_per_generation: Optional[int] = Field(
        None, gt=0, description="Generate completions for this many optimizer micro-steps at once (TRL's "
        "steps_per_generation; None: gradient_accumulation_steps). Generation time grows with the number of "
        "new tokens, hardly with the batch, so a larger block makes each RL step cheaper on a GPU.")
    max_steps: int = Field(300, gt=0)
    max_prompt_chars: Optional[int] = Field(1500, gt=0, description="Drop longer prompts (keeps memory flat).")
    max_completion_length: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0)
    max_prompts: Optional[int] = Field(None, gt=0, description="Seeded cap on RL prompts.")


class PredictConfig(Section):
    max_examples: Optional[int] = Field(None, gt=0, description="Cap on test samples (seeded).")
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(8, gt=0)
    compare_base: bool = Field(True, description="Recipe A: also generate with the base model.")
    side_by_side: int = Field(5, ge=0, description="Recipe B: this many test samples (seeded) with every "
                              "model's answer in predict/side_by_side.md (0: none).")
    embedding_model: Optional[str] = Field(None, description="Sentence-embedding model for cosine; None: "
                                           "the kit's default (all-MiniLM-L6-v2, offline).")


class RecipeConfig(Section):
    kind: Optional[Literal["soulchat", "covid"]] = Field(None, description="Which recipe this run is.")
    steps: list[Literal["data", "sft", "reward", "rl", "predict"]] = Field(
        default_factory=lambda: ["data", "sft", "predict"],
        description="Steps `python -m phyassist recipe` runs, in order (covid: data, sft, reward, rl, predict).")
    lang: Literal["zh", "en"] = "zh"
    data: DialogueDataConfig = Field(default_factory=DialogueDataConfig)
    preference: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    sft_adapter: Optional[str] = Field(None, description="Use this SFT adapter instead of <out>/sft/adapter "
                                       "(the best checkpoint's with train.load_best_model_at_end).")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reward_adapter: Optional[str] = Field(None, description="Use this reward adapter instead of "
                                          "<out>/reward/adapter.")
    rl: RLConfig = Field(default_factory=RLConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    images_dir: Optional[str] = Field(None, description="Where plots go; None: <output_dir>/images "
                                      "(the committed results use images/recipes/<run>).")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        if isinstance(data, dict) and "sft_load_best" in data:
            raise ValueError("recipe.sft_load_best was replaced by train.load_best_model_at_end (one switch for "
                             "every SFT run: the lowest-eval-loss checkpoint is kept and becomes <out>/sft/adapter)")
        return data
