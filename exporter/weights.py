"""From checkpoint tensors to the export model's parameters, one bounded piece at a time.

Parameter names (model.py) are checkpoint names where a tensor maps 1:1; three are repacked:
    model.layers.{L}.mlp.experts.gate_up        [E, 2I, H]  per expert gate rows then up rows,
                                                            or interleaved g0,u0,g1,u1 (ONNX
                                                            Runtime's MoE with swiglu_fusion=1),
                                                            or blocks of b gate rows and b up rows
                                                            (gate_up_block b: QmoeRoutedExperts)
    model.layers.{L}.mlp.experts.down           [E, H, I]
    model.layers.{L}.mlp.shared_expert.gate_up  [2Is, H]    gate rows then up rows, or blocks of b
`pieces()` yields each parameter as consecutive row blocks in memory order, so the writer never
holds more than one expert or ~64 MB of one tensor.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from .checkpoint import Checkpoint, TensorInfo

PIECE_BYTES = 64 * 1024 * 1024

EXPERTS_PARAM = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)$")
SHARED_PARAM = re.compile(r"(model\.layers\.\d+\.mlp\.shared_expert)\.gate_up$")


def direct_source(ckpt: Checkpoint, name: str) -> TensorInfo | None:
    """The checkpoint tensor that is this parameter byte for byte (dtype aside), if any."""
    if EXPERTS_PARAM.match(name) or SHARED_PARAM.match(name):
        return None
    if ckpt.lora is not None and ckpt.lora.touches(name):
        return None  # a LoRA changes it
    return ckpt.info(name)


def _row_ranges(ckpt: Checkpoint, name: str, tensors: int = 1, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """Row ranges [start, stop) of tensor `name` of about PIECE_BYTES over `tensors` tensors of its
    shape read side by side, each a whole number of `multiple` rows (the last may be shorter)."""
    info = ckpt.info(name)
    row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
    step = max(1, PIECE_BYTES // (tensors * row_bytes) // multiple) * multiple
    for r in range(0, info.shape[0], step):
        yield r, r + step


def _row_blocks(ckpt: Checkpoint, name: str) -> Iterator[torch.Tensor]:
    for start, stop in _row_ranges(ckpt, name):
        yield ckpt.rows(name, start, stop)


def blocked(gate: torch.Tensor, up: torch.Tensor, block: int) -> torch.Tensor:
    """Rows of gate [n, H] and up [n, H] (n a multiple of block) as gate 0..b-1, up 0..b-1, gate b..2b-1, ..."""
    h = gate.shape[-1]
    return torch.stack((gate.reshape(-1, block, h), up.reshape(-1, block, h)), dim=1).reshape(-1, h)


def pieces(ckpt: Checkpoint, name: str, interleaved: bool, gate_up_block: int = 0) -> Iterator[torch.Tensor]:
    """Parameter `name` as row blocks in memory order (dtype as stored in the checkpoint); gate/up
    rows as the module docstring says for `interleaved` and `gate_up_block`."""
    m = EXPERTS_PARAM.match(name)
    if m:
        layer, which = int(m.group(1)), m.group(2)
        for e in range(ckpt.config.num_experts):  # each parameter reads only its own tensors
            if which == "down":
                yield ckpt.expert_down(layer, e)
                continue
            gate, up = ckpt.expert_gate_up(layer, e)
            if interleaved:
                yield torch.stack((gate, up), dim=1).reshape(-1, gate.shape[-1])  # g0,u0,g1,u1,...
            elif gate_up_block:
                yield blocked(gate, up, gate_up_block)
            else:
                yield torch.cat((gate, up), dim=0)
        return
    m = SHARED_PARAM.match(name)
    if m:
        gate, up = m.group(1) + ".gate_proj.weight", m.group(1) + ".up_proj.weight"
        if gate_up_block:  # the same row range of both, ~64 MB in all, a whole number of blocks
            for start, stop in _row_ranges(ckpt, gate, tensors=2, multiple=gate_up_block):
                yield blocked(ckpt.rows(gate, start, stop), ckpt.rows(up, start, stop), gate_up_block)
            return
        yield from _row_blocks(ckpt, gate)
        yield from _row_blocks(ckpt, up)
        return
    yield from _row_blocks(ckpt, name)


def load_into(model: torch.nn.Module, ckpt: Checkpoint, interleaved: bool, gate_up_block: int = 0) -> None:
    """Fills a real (non-meta) export model; for tests and small checkpoints only."""
    for name, p in model.named_parameters():
        full = torch.cat([t.to(p.dtype) for t in pieces(ckpt, name, interleaved, gate_up_block)], dim=0)
        p.data.copy_(full.reshape(p.shape))
