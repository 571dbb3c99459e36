"""Config section ``evaluate``."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from phyassist.schema_base import Section


class EvalConfig(Section):
    test_dir: Optional[str] = Field(None, description="IMHI test_instruction folder; None: bundled sample.")
    sets: list[str] = Field(default_factory=lambda: ["DR", "dreaddit", "Irf", "MultiWD", "SAD"])
    max_examples: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(256, gt=0)
