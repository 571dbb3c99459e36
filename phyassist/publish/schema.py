"""Config section ``publish``."""

from __future__ import annotations

from typing import Optional

from phyassist.schema_base import Section


class PublishConfig(Section):
    repo_id: Optional[str] = None
    private: bool = True
    license: str = "mit"
