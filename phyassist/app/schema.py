"""Config section ``app``."""

from __future__ import annotations

from phyassist.schema_base import Section


class AppConfig(Section):
    host: str = "127.0.0.1"
    port: int = 7860
