"""Run configuration: one YAML file per run, validated on load, overridable from the CLI.

The root schema is assembled from one section per stage; each stage owns its section in
``phyassist/<stage>/schema.py`` so that a student adapting the kit edits YAML, never code.
Unknown keys, wrong types and bad values fail on load with the offending key named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phyassist.app.schema import AppConfig
from phyassist.data.schema import DataConfig
from phyassist.evaluate.schema import EvalConfig
from phyassist.models.schema import ModelConfig
from phyassist.publish.schema import PublishConfig
from phyassist.recipes.schema import RecipeConfig
from phyassist.train.schema import TrainConfig, WandbConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and key."""


class RunConfig(BaseModel):
    """The whole run: what to load, how to train, evaluate, publish and serve."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("run", description="Run name; used for output folders and wandb.")
    seed: int = 42
    output_dir: str = Field("runs/{name}", description="Where the run writes; {name} expands.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    app: AppConfig = Field(default_factory=AppConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)

    @property
    def out(self) -> Path:
        """The run's output folder, with ``{name}`` expanded."""
        return Path(self.output_dir.format(name=self.name))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} error(s))"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check spelling; see configs/ for valid keys)")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.max_steps=10`` -> (['train', 'max_steps'], 10); values parse as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def _step(node: Any, part: str, where: str, create: bool) -> Any:
    """The child ``part`` of a section (key) or a list (index); ``create`` makes a missing section."""
    if isinstance(node, list):
        if not part.isdigit():
            raise ConfigError(f"override {where}: {part!r} is not an index of a list (use 0..{len(node) - 1})")
        i = int(part)
        if i >= len(node):
            raise ConfigError(f"override {where}: index {i} is past the end of a list of {len(node)} item(s)")
        return node[i]
    if not isinstance(node, dict):
        raise ConfigError(f"override {where}: not a section or a list")
    if node.get(part) is None and create:
        node[part] = {}
    return node.get(part)


def apply_overrides(raw: dict, overrides: Iterable[str] | dict | None) -> dict:
    """Return a copy of ``raw`` with dotted overrides applied (list of ``k=v`` or a dict).

    A numeric part indexes a list: ``data.sources.0.path=my.csv`` sets the first source's path."""
    out = copy.deepcopy(raw)
    if not overrides:
        return out
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else list(key)
        node = out
        for n, p in enumerate(parts[:-1]):
            where = ".".join(parts[: n + 1])
            nxt = _step(node, p, ".".join(parts), create=True)
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {'.'.join(parts)}: {where} is not a section or a list")
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            _step(node, last, ".".join(parts), create=False)
            node[int(last)] = value
        else:
            node[last] = value
    return out


def resolve_config_path(path: str | Path) -> Path:
    """Accept a path or a profile name (``smoke`` -> ``configs/smoke.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"{path}: config file not found (profiles: {', '.join(list_profiles())})")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: str | Path) -> tuple[Path, dict]:
    """Read a YAML file, following ``base: other.yaml`` (relative to the file) for inheritance."""
    p = resolve_config_path(path)
    data = read_yaml(p)
    base = data.pop("base", None)
    if base:
        base_path = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        _, base_data = load_raw(base_path if base_path.exists() else base)
        data = _merge(base_data, data)
    return p, data


def validate(raw: dict, source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: Iterable[str] | dict | None = None) -> RunConfig:
    """Load, apply overrides, validate. Raises ConfigError naming file and key."""
    p, raw = load_raw(path)
    return validate(apply_overrides(raw, overrides), str(p))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
