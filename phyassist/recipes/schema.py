"""Config section ``recipe``."""

from __future__ import annotations

from typing import Optional

from phyassist.schema_base import Section


class RecipeConfig(Section):
    kind: Optional[str] = None
