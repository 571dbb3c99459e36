"""The model card, generated from the run: metadata (base model, ``library_name: peft``, license,
data sets, ``model-index`` results) through huggingface_hub's ModelCardData, and a body that says
what the adapter is, how it was trained and scored, how to load it, and what it must not be used for.

``validate_card`` checks the metadata offline (the Hub's own check needs the network and runs
before a real upload).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from phyassist.config import RunConfig
from phyassist.publish.package import MERGE_INFO, PublishError
from phyassist.publish.report import Score

# The Hub's license identifiers (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0
eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research
lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa
unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3
llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())

METRIC_NAMES = {"weighted_f1": ("f1", "Weighted F1 (x100)"), "bartscore": ("bartscore", "BARTScore")}


@dataclass(frozen=True)
class DataSource:
    """A training data set as the card cites it."""

    name: str
    url: str
    license: str
    hub_id: str | None = None  # only real Hub data set ids go into the metadata


DATA_CATALOGUE = {
    "imhi": DataSource("MentalLLaMA IMHI (Interpretable Mental Health Instruction)",
                       "https://github.com/SteveKGYang/MentalLLaMA", "MIT"),
    "counsel_chat": DataSource("counsel-chat", "https://huggingface.co/datasets/nbertagnolli/counsel-chat",
                               "MIT", "nbertagnolli/counsel-chat"),
}

NON_CLINICAL_NOTICE = (
    "> **Not for clinical use.** This adapter is a research artefact. Its outputs are drafts for a "
    "trained professional, never a diagnosis, a treatment plan or advice to a patient. It must not face "
    "patients or people in crisis, and it was not validated for any clinical decision. If you or someone "
    "you know is in danger, contact local emergency services."
)


@dataclass
class RunFacts:
    """What the card reports about the run, gathered from the run's files."""

    base_model: str | None
    hardware: str
    wandb: str | None = None
    trainer: dict = field(default_factory=dict)
    merge: dict | None = None


class CardError(PublishError):
    """The card's metadata would not be accepted by the Hub."""


# ---------------------------------------------------------------- facts from the run

def base_model_id(cfg: RunConfig) -> str | None:
    """The Hub id of the base model: configured, else the registry's, else model.name when Hub-shaped."""
    from phyassist.models.registry import hub_id_of

    return cfg.publish.base_model or hub_id_of(cfg.model.name)


def hardware_text(cfg: RunConfig) -> str:
    """Configured hardware, else the recorded run's device (versions.json) and the model placement."""
    if cfg.publish.hardware:
        return cfg.publish.hardware
    m = cfg.model
    if m.device_map == "cpu":
        where = "CPU"
    elif m.num_gpus:
        cap = f", capped at {m.max_memory_per_gpu} each" if m.max_memory_per_gpu else ""
        where = f"{m.num_gpus} GPU(s){cap}"
    else:
        where = "the GPU(s) present"
    versions = cfg.out / "versions.json"
    if versions.is_file():
        v = json.loads(versions.read_text(encoding="utf-8"))
        where += f"; platform {v.get('platform', '?')}, torch {v.get('torch', '?')}"
    return where


def trainer_facts(adapter: Path, out: Path) -> dict:
    """Steps, runtime and loss from the newest trainer_state.json (adapter folder or checkpoints)."""
    candidates = [adapter / "trainer_state.json"] + sorted(
        (out / "checkpoints").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1)
    found = [p for p in candidates if p.is_file()]
    if not found:
        return {}
    state = json.loads(found[-1].read_text(encoding="utf-8"))
    facts = {"global_step": state.get("global_step")}
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    if losses:
        facts["first_loss"], facts["last_loss"] = losses[0], losses[-1]
    for e in state.get("log_history", []):
        for k in ("train_runtime", "train_loss", "total_flos"):
            if k in e:
                facts[k] = e[k]
    return {k: v for k, v in facts.items() if v is not None}


def wandb_link(cfg: RunConfig) -> str | None:
    """The wandb run link when the run logged online; a note on the offline folder otherwise."""
    if cfg.publish.wandb_url:
        return cfg.publish.wandb_url
    if cfg.wandb.mode == "disabled":
        return None
    runs = sorted((cfg.out / "wandb").glob("*run-*"))
    if not runs:
        return None
    run = runs[-1]
    run_id = run.name.rsplit("-", 1)[-1]
    if cfg.wandb.mode == "online" and cfg.wandb.entity:
        return f"https://wandb.ai/{cfg.wandb.entity}/{cfg.wandb.project}/runs/{run_id}"
    return f"logged {cfg.wandb.mode} (run {run_id}, project {cfg.wandb.project}); `wandb sync` uploads it"


def run_facts(cfg: RunConfig, adapter: Path) -> RunFacts:
    merge = None
    if (adapter / MERGE_INFO).is_file():
        merge = json.loads((adapter / MERGE_INFO).read_text(encoding="utf-8"))
    return RunFacts(base_model=base_model_id(cfg), hardware=hardware_text(cfg), wandb=wandb_link(cfg),
                    trainer=trainer_facts(adapter, cfg.out), merge=merge)


def data_sources(cfg: RunConfig) -> list[tuple[DataSource, list[str]]]:
    """Each cited data set with the sources of the config that came from it (rows used)."""
    out: dict[str, tuple[DataSource, list[str]]] = {}
    for s in cfg.data.sources:
        ds = DATA_CATALOGUE.get(s.kind) or DataSource(
            f"{s.name} (local table)", s.path or "(local file)", "unknown: check before publishing")
        rows = f"{s.name}: {s.n_rows} rows" if s.n_rows else f"{s.name}: all rows"
        out.setdefault(ds.name, (ds, []))[1].append(rows)
    return list(out.values())


# ---------------------------------------------------------------- card

def eval_results(scores: list[Score]):
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", task_name="Mental health analysis (IMHI)",
                       dataset_type="imhi", dataset_name=f"IMHI {s.set}", dataset_config=s.set,
                       dataset_split="test", metric_type=METRIC_NAMES[s.metric][0],
                       metric_name=METRIC_NAMES[s.metric][1], metric_value=round(s.value, 4))
            for s in scores]


def card_data(cfg: RunConfig, facts: RunFacts, scores: list[Score], model_name: str):
    from huggingface_hub import ModelCardData

    hub_datasets = sorted({ds.hub_id for ds, _ in data_sources(cfg) if ds.hub_id})
    return ModelCardData(
        base_model=facts.base_model, library_name="peft", license=cfg.publish.license,
        language=cfg.publish.language, pipeline_tag="text-generation", datasets=hub_datasets or None,
        tags=["peft", "lora"] + (["qlora"] if cfg.model.quant.load_in_4bit else []) + ["mental-health", "phyassist"],
        model_name=model_name, eval_results=eval_results(scores) or None,
        metrics=sorted({METRIC_NAMES[s.metric][0] for s in scores}) or None)


def _hyperparameter_rows(cfg: RunConfig) -> list[tuple[str, object]]:
    t, lora, q = cfg.train, cfg.train.lora, cfg.model.quant
    quant = (f"4-bit {q.quant_type.upper()}, double quant {q.double_quant}, compute {q.compute_dtype}"
             if q.load_in_4bit else f"none ({cfg.model.dtype})")
    return [("quantization", quant), ("LoRA r / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
            ("LoRA targets", ", ".join(lora.target_modules) + (" + router gate" if lora.target_router else "")),
            ("optimizer", t.optim), ("learning rate", t.learning_rate), ("schedule", t.lr_scheduler_type),
            ("warmup ratio", t.warmup_ratio), ("max grad norm", t.max_grad_norm),
            ("batch", f"{t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps}"),
            ("max steps", t.max_steps), ("max sequence length", cfg.model.max_seq_length),
            ("loss", "answer tokens only" if t.completion_only_loss else "all tokens"),
            ("gradient checkpointing", t.gradient_checkpointing), ("seed", cfg.seed)]


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _eval_section(scores: list[Score], report_text: str | None, report_name: str = "") -> str:
    if not scores and report_text is None:
        return "## Evaluation\n\nThis adapter was published without an evaluation report.\n"
    parts = ["## Evaluation\n", "IMHI test sets (MentalLLaMA's `test_instruction`), scored by the kit's "
             "evaluation stage. Weighted F1 is x100; BARTScore is the mean log-likelihood of the gold "
             "explanation given the generated one (higher is better).\n"]
    by_set: dict[str, dict[str, float]] = {}
    for s in scores:
        by_set.setdefault(s.set, {})[s.metric] = s.value
    if by_set:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        parts.append(_table(("IMHI set", "weighted F1", "BARTScore"),
                            [(k, fmt(v.get("weighted_f1")), fmt(v.get("bartscore"))) for k, v in by_set.items()]))
    if report_text:
        parts.append(f"\n### Full report (eval/{report_name} in this repository)\n\n" + report_text.strip())
    return "\n".join(parts) + "\n"


def usage_snippet(repo_id: str, base_model: str | None, cfg: RunConfig) -> str:
    q = cfg.model.quant
    return f"""```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{q.quant_type}",
                         bnb_4bit_use_double_quant={q.double_quant}, bnb_4bit_compute_dtype=torch.bfloat16)
base = AutoModelForCausalLM.from_pretrained("{base_model or '<base model>'}", quantization_config=bnb,
                                            device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # carries the chat template used in training
model = PeftModel.from_pretrained(base, "{repo_id}").eval()

messages = [{{"role": "user", "content": "Consider this post: ... Question: Does the poster suffer from stress?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def card_body(cfg: RunConfig, facts: RunFacts, scores: list[Score], report_text: str | None,
              repo_id: str) -> str:
    src = [(f"[{ds.name}]({ds.url})", ds.license, "; ".join(rows)) for ds, rows in data_sources(cfg)]
    tr = facts.trainer
    run_rows = [(k.replace("_", " "), f"{v:.4g}" if isinstance(v, float) else v) for k, v in tr.items()]
    merge = ""
    if facts.merge:
        m = facts.merge
        merge = ("\n## Merged adapter\n\nThis adapter combines "
                 f"{len(m.get('adapters', []))} adapters with PEFT's `add_weighted_adapter` "
                 f"(`{m.get('combination')}`, weights {m.get('weights')}, density {m.get('density')}):\n\n"
                 + "\n".join(f"- `{a}`" for a in m.get("adapters", [])) + "\n")
    return f"""# {repo_id.split('/')[-1]}

A LoRA adapter made with the PhyAssist kit: a psychological counselor's assistant
fine-tuned from `{facts.base_model or cfg.model.name}` (run `{cfg.name}`).

{NON_CLINICAL_NOTICE}

## Intended use

Research on mental-health text analysis and on drafting notes **for a counselor**, who reviews
every output. Out of scope: any patient-facing use, crisis support, diagnosis, or decisions about a
person. The training data are social-media posts and public therapist answers: expect their biases
(English, Reddit/Twitter populations, US counseling norms).

## Training data

{_table(("data set", "license", "rows used"), src) if src else "Not recorded in the run config."}

## Training procedure

{_table(("hyper-parameter", "value"), _hyperparameter_rows(cfg))}

- Hardware: {facts.hardware}
- Tracking: {facts.wandb if facts.wandb and facts.wandb.startswith('http') else (facts.wandb or 'wandb disabled')}
{chr(10) + _table(("run", "value"), run_rows) if run_rows else ""}
The resolved training configuration is in `config.resolved.yaml` in this repository.
{merge}
{_eval_section(scores, report_text, Path(cfg.publish.eval_report).name)}
## How to use (4-bit)

{usage_snippet(repo_id, facts.base_model, cfg)}

## License

The adapter is released under `{cfg.publish.license}`. The base model keeps its own license; the
training data sets are MIT-licensed (see above).
"""


def build_card(cfg: RunConfig, facts: RunFacts, scores: list[Score], report_text: str | None, repo_id: str):
    from huggingface_hub import ModelCard

    data = card_data(cfg, facts, scores, model_name=repo_id.split("/")[-1])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(cfg, facts, scores, report_text, repo_id)}")


# ---------------------------------------------------------------- offline validation

def validate_card(text: str) -> dict:
    """Parse the card as the Hub would and check its metadata offline; return the metadata.

    Raises CardError listing every problem: a missing base model, library or license, an unknown
    license id, a data set or base model id that is not Hub-shaped, or a model-index that does not
    parse or holds a non-numeric value.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        card = ModelCard(text)
    except ValueError as exc:
        raise CardError(f"model card metadata does not parse: {exc}") from None
    meta = card.data.to_dict()
    problems = []
    for key in ("base_model", "library_name", "license"):
        if not meta.get(key):
            problems.append(f"{key} missing" + (" (set publish.base_model to the base's Hub id)"
                                                if key == "base_model" else ""))
    if meta.get("library_name") not in (None, "peft"):
        problems.append(f"library_name is {meta['library_name']!r}, expected 'peft' for an adapter")
    if meta.get("license") and meta["license"] not in HUB_LICENSES:
        problems.append(f"license {meta['license']!r} is not a Hub license id")
    ids = ([meta["base_model"]] if isinstance(meta.get("base_model"), str) else meta.get("base_model") or [])
    for key, values in (("base_model", ids), ("datasets", meta.get("datasets") or [])):
        for v in values:
            try:
                validate_repo_id(v)
            except HFValidationError as exc:
                problems.append(f"{key} {v!r}: not a Hub id ({exc})")
    if "model-index" in meta:
        try:
            _, results = model_index_to_eval_results(meta["model-index"])
            bad = [r for r in results if not isinstance(r.metric_value, (int, float))
                   or not math.isfinite(r.metric_value)]
            problems += [f"model-index {r.dataset_name} {r.metric_type}: value {r.metric_value!r} is not a number"
                         for r in bad]
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"model-index does not parse: {exc}")
    if problems:
        raise CardError("model card metadata invalid: " + "; ".join(problems))
    return meta

