"""Config section ``publish``: what goes into the published folder, where it goes on the Hub,
and how the load-back check and adapter merging behave."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from phyassist.schema_base import Section

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")

DEFAULT_CHECK_PROMPTS = [
    "I can't sleep and I keep worrying about my exams. Is this anxiety?",
    "Consider this post: \"Nothing I do matters any more and I feel empty.\" Question: Does the poster "
    "suffer from depression?",
    "How can I support a friend who says they feel lonely all the time?",
]


class MergeConfig(Section):
    """PEFT weighted merging of several adapters into one new adapter."""

    combination: Literal[COMBINATIONS] = Field(  # type: ignore[valid-type]
        "linear", description="PEFT add_weighted_adapter combination_type (linear, ties, dare_ties, cat, ...).")
    density: Optional[float] = Field(
        None, gt=0, le=1, description="Fraction of weights kept by TIES/DARE/magnitude pruning (default 0.5).")
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: Optional[int] = Field(None, gt=0, description="Rank of *_svd results (default: largest input).")


class PublishConfig(Section):
    repo_id: Optional[str] = Field(
        None, description="Hub repo 'owner/name'; a bare name gets the token's user; None: phyassist-<run name>.")
    private: bool = Field(True, description="Create the Hub repo private (the default) or public.")
    license: str = Field("mit", description="License of the published adapter (Hub license id).")
    base_model: Optional[str] = Field(
        None, description="Hub id of the base model for the card; None: the registry's Hub id for model.name.")
    adapter_dir: Optional[str] = Field(None, description="Adapter to publish; None: <output_dir>/adapter.")
    package_dir: Optional[str] = Field(None, description="Folder built for upload; None: <output_dir>/publish/package.")
    eval_results: str = Field(
        "eval/comparison.csv", description="Evaluation table (CSV, the evaluation stage's), relative to the output folder or absolute.")
    eval_report: str = Field(
        "eval/comparison.md", description="Evaluation report (Markdown), relative to the output folder or absolute.")
    eval_optional: bool = Field(
        False, description="Publish without an evaluation report (the card then says it was not evaluated).")
    eval_model: str = Field(
        "finetuned", description="Row label of the evaluation table that describes the published adapter.")
    commit_message: str = Field("Upload PhyAssist adapter", description="Commit message of the upload.")
    hardware: Optional[str] = Field(
        None, description="Training hardware for the card; None: taken from the run's files and config.")
    wandb_url: Optional[str] = Field(None, description="wandb run link for the card; None: found from the run.")
    language: list[str] = Field(default_factory=lambda: ["en"])
    load_back_check: bool = Field(
        True, description="Before upload, load the built folder on the base model and compare logits.")
    check_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_CHECK_PROMPTS), min_length=1)
    check_atol: float = Field(1e-4, ge=0, description="Largest logit difference the load-back check accepts.")
    merge: MergeConfig = Field(default_factory=MergeConfig)
