"""qmoe runtime: runs exported Qwen2-MoE artifacts (no torch needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine


def load(artifact, backend: str = "auto", device: str = "auto", rope_mode=None, prefill_chunk: int = 2048,
         threads: int | None = None) -> "Engine":
    """Opens an artifact folder made by `qmoe export` (see runtime.engine.Engine)."""
    from .engine import Engine

    return Engine(artifact, backend=backend, device=device, rope_mode=rope_mode, prefill_chunk=prefill_chunk,
                  threads=threads)
