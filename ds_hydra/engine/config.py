"""Schema of the ``engine`` config group: how many processes train and how (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    name: str = "auto"
    """auto: one process (distributed engines arrive with their own options)."""
