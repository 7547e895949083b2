"""Torch references for the plugin kernels (independent of the CUDA code).

The MoE reference follows transformers' ``Qwen2MoeSparseMoeBlock`` (5.x: router Linear, fp32
softmax, top-k, optional renormalisation, SwiGLU experts, sigmoid-gated shared expert);
``test_moe_reference.py`` checks it against transformers' module itself. It is split in two stages
so the GPU tests can check the experts with the kernel's own routing (top-k near ties would otherwise
make a correct kernel pick a different expert than the reference):

- ``route``: logits rounded to the activation dtype (what a bf16/fp16 ``nn.Linear`` returns), fp32
  softmax, top-k; also the gap between the k-th and (k+1)-th logit to find near ties.
- ``experts``: float64 math on the given weights (upcast), for given ids and weights.

Weights use the contract layout: gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I],
shared_gate_up [2Is, H], shared_down [H, Is], shared_expert_gate [1, H], router [E, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoeShape:
    hidden: int
    experts: int
    top_k: int
    inter: int
    shared_inter: int


# The target model (Qwen2-57B-A14B) and test shapes. "odd" has sizes that are multiples of 8 but not of
# the kernels' 64/128 tiles, so partial tiles and masked stores are exercised.
QWEN2_57B = MoeShape(hidden=3584, experts=64, top_k=8, inter=2560, shared_inter=20480)
E64_TOP8 = MoeShape(hidden=256, experts=64, top_k=8, inter=128, shared_inter=512)
ODD_SMALL = MoeShape(hidden=136, experts=8, top_k=2, inter=40, shared_inter=88)


# Exact routing inputs: router/shared-gate weights on a 2^-9 grid below 0.5 and hidden states on a
# 2^-3 grid below 8 have at most 8 significant bits (exact in bf16 and fp16), their products lie on a
# 2^-12 grid, and any sum of up to 2^10 products stays below 2^24 grid steps: every fp32 dot product
# is exact whatever the summation order, so the kernel and the reference round identical logits.
_W_STEP, _W_MAX = 2.0**-9, 255 * 2.0**-9
_X_STEP, _X_MAX = 2.0**-3, 63 * 2.0**-3


def _quantize(t: torch.Tensor, step: float, max_abs: float) -> torch.Tensor:
    return (t / step).round().clamp(-max_abs / step, max_abs / step) * step


def make_weights(shape: MoeShape, dtype: torch.dtype, device: str, seed: int = 0,
                 favoured: int | None = None, exact_router: bool = False) -> dict[str, torch.Tensor]:
    """Random weights with outputs of order 1. ``favoured``: only that many experts have a router row
    aligned with the hidden states' mean, so (with ``make_hidden(..., skew=True)``) most experts get
    no tokens at all. ``exact_router``: router and shared-gate weights on the exact grid above."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, E, I, Is = shape.hidden, shape.experts, shape.inter, shape.shared_inter

    def randn(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=g) * scale

    router = randn(E, H, scale=H**-0.5)
    if favoured is not None:
        # logit_e ~ bias_e * mean(x) + small noise: distinct biases keep the favoured ranking clear.
        bias = torch.zeros(E)
        bias[:favoured] = 4.0 + 0.5 * torch.arange(favoured, dtype=torch.float32)
        router = randn(E, H, scale=0.1 * H**-0.5) + bias[:, None] / H
    shared_gate = randn(1, H, scale=H**-0.5)
    if exact_router:
        assert H <= 1024, "exact logits need H <= 2^10"
        router, shared_gate = _quantize(router, _W_STEP, _W_MAX), _quantize(shared_gate, _W_STEP, _W_MAX)
    w = {
        "router_weight": router,
        "gate_up_weight": randn(E, 2 * I, H, scale=H**-0.5),
        "down_weight": randn(E, H, I, scale=I**-0.5),
        "shared_gate_up_weight": randn(2 * Is, H, scale=H**-0.5),
        "shared_down_weight": randn(H, Is, scale=Is**-0.5),
        "shared_expert_gate_weight": shared_gate,
    }
    return {k: v.to(dtype=dtype, device=device).contiguous() for k, v in w.items()}


def make_weights_on_device(shape: MoeShape, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Like ``make_weights`` (uniform routing) but drawn on the device one expert at a time: for the
    benchmark's 57B-sized layer, where host generation would take minutes and tens of GB."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, E, I, Is = shape.hidden, shape.experts, shape.inter, shape.shared_inter

    def randn(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    return {
        "router_weight": randn(E, H, scale=H**-0.5),
        "gate_up_weight": torch.stack([randn(2 * I, H, scale=H**-0.5) for _ in range(E)]),
        "down_weight": torch.stack([randn(H, I, scale=I**-0.5) for _ in range(E)]),
        "shared_gate_up_weight": randn(2 * Is, H, scale=H**-0.5),
        "shared_down_weight": randn(H, Is, scale=Is**-0.5),
        "shared_expert_gate_weight": randn(1, H, scale=H**-0.5),
    }


def make_hidden(tokens: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 1,
                skew: bool = False, exact: bool = False) -> torch.Tensor:
    """Standard normal hidden states (+1 with ``skew``); ``exact``: on the exact grid above."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    if skew:
        x = x + 1.0  # a common component the favoured router rows pick up
    if exact:
        x = _quantize(x, _X_STEP, _X_MAX)
    return x.to(dtype=dtype, device=device).contiguous()


@dataclass(frozen=True)
class Routing:
    ids: torch.Tensor  # int64 [T, k], descending probability
    weights: torch.Tensor  # fp32 [T, k]
    shared_gate: torch.Tensor  # fp32 [T]
    logits: torch.Tensor  # fp32 [T, E], rounded to the activation dtype
    tie_gap: torch.Tensor  # fp32 [T]: k-th minus (k+1)-th largest logit (inf when k == E)


def route(x: torch.Tensor, w: dict[str, torch.Tensor], top_k: int, norm_topk_prob: bool) -> Routing:
    """transformers' Qwen2MoeTopKRouter + shared gate, logits accumulated in float64 then rounded."""
    x64 = x.double()
    logits = (x64 @ w["router_weight"].double().T).to(x.dtype).float()  # [T, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    E = logits.shape[-1]
    gap = (sorted_logits[:, top_k - 1] - sorted_logits[:, top_k]) if top_k < E else torch.full_like(logits[:, 0], float("inf"))
    sg_logit = (x64 @ w["shared_expert_gate_weight"].double().T).to(x.dtype).float()[:, 0]
    return Routing(ids, top, torch.sigmoid(sg_logit), logits, gap)


def experts(x: torch.Tensor, w: dict[str, torch.Tensor], ids: torch.Tensor, weights: torch.Tensor,
            shared_gate: torch.Tensor | None) -> torch.Tensor:
    """Routed sum + gated shared expert in float64 for the given routing. Returns float64 [T, H]."""
    x64 = x.double()
    out = torch.zeros_like(x64)
    ids = ids.long()
    gate_up = w["gate_up_weight"]
    inter = gate_up.shape[1] // 2
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gu = x64[tok] @ gate_up[e].double().T  # [n, 2I]
        act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = act @ w["down_weight"][e].double().T  # [n, H]
        out.index_add_(0, tok, y * weights[tok, slot].double()[:, None])
    if shared_gate is not None and "shared_gate_up_weight" in w:
        sgu = x64 @ w["shared_gate_up_weight"].double().T
        si = sgu.shape[1] // 2
        shared = (torch.nn.functional.silu(sgu[:, :si]) * sgu[:, si:]) @ w["shared_down_weight"].double().T
        out += shared_gate.double()[:, None] * shared
    return out


def shared_expert_eager(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gated shared expert as separate torch ops in x's dtype (cuBLAS on a GPU): what vLLM runs
    beside its fused routed-experts kernel for Qwen2-MoE, so the benchmark can time that pair."""
    silu = torch.nn.functional.silu
    gate, up = (x @ w["shared_gate_up_weight"].T).chunk(2, dim=-1)
    return torch.sigmoid(x @ w["shared_expert_gate_weight"].T) * ((silu(gate) * up) @ w["shared_down_weight"].T)


def to_transformers_block(shape: MoeShape, w: dict[str, torch.Tensor], norm_topk_prob: bool):
    """transformers' Qwen2MoeSparseMoeBlock holding these weights (same dtype and device)."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=shape.hidden, num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                         moe_intermediate_size=shape.inter, shared_expert_intermediate_size=shape.shared_inter,
                         norm_topk_prob=norm_topk_prob, hidden_act="silu")
    ref = w["router_weight"]
    with torch.device(ref.device):  # built where it runs: no host copy of 57B-sized experts
        block = Qwen2MoeSparseMoeBlock(cfg).to(dtype=ref.dtype).eval()
    config = getattr(block.experts, "config", None)
    if config is not None:
        config._experts_implementation = "eager"  # transformers' own loop (its default too)
    Is = shape.shared_inter
    with torch.no_grad():
        block.gate.weight.copy_(w["router_weight"])
        if hasattr(block.experts, "gate_up_proj"):  # transformers 5: stacked experts
            block.experts.gate_up_proj.copy_(w["gate_up_weight"])
            block.experts.down_proj.copy_(w["down_weight"])
        else:  # transformers 4: one Qwen2MoeMLP per expert
            I = shape.inter
            for e, mlp in enumerate(block.experts):
                mlp.gate_proj.weight.copy_(w["gate_up_weight"][e, :I])
                mlp.up_proj.weight.copy_(w["gate_up_weight"][e, I:])
                mlp.down_proj.weight.copy_(w["down_weight"][e])
        block.shared_expert.gate_proj.weight.copy_(w["shared_gate_up_weight"][:Is])
        block.shared_expert.up_proj.weight.copy_(w["shared_gate_up_weight"][Is:])
        block.shared_expert.down_proj.weight.copy_(w["shared_down_weight"])
        block.shared_expert_gate.weight.copy_(w["shared_expert_gate_weight"])
    return block


def transformers_forward(block, x: torch.Tensor) -> torch.Tensor:
    """block(x) for x [T, H] -> [T, H] (transformers 4 also returned the router logits)."""
    out = block(x[None])
    if isinstance(out, tuple):
        out = out[0]
    return out[0]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor, heads: int,
           head_dim: int) -> torch.Tensor:
    """GPT-NeoX rotation of x [B, S, heads*D] in float64 (transformers' rotate_half convention)."""
    B, S, _ = x.shape
    xh = x.double().view(B, S, heads, head_dim)
    c = cos.double()[position_ids][:, :, None, :]  # [B, S, 1, D/2]
    s = sin.double()[position_ids][:, :, None, :]
    x1, x2 = xh[..., : head_dim // 2], xh[..., head_dim // 2 :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.view(B, S, heads * head_dim)
