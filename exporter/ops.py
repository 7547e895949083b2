"""Custom torch ops for the parts of Qwen2-MoE that become single fused ONNX nodes.

    [attention] -> com.microsoft::GroupQueryAttention (onnxruntime) | QmoeRotary + opset ops (tensorrt)
    [moe_block] -> router Gemm + com.microsoft::MoE + shared expert (onnxruntime) | QmoeRoutedExperts (tensorrt)

Each op has a plain-torch reference implementation (the semantics the ONNX nodes must match; the
parity tests run it against transformers) and a fake implementation for tracing on the meta
device, where no weight is ever loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary on the last dim: halves (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("qmoe::attention", mutates_args=())
def attention(
    query: torch.Tensor,  # [B, S, Hq*D]
    key: torch.Tensor,  # [B, S, Hkv*D]
    value: torch.Tensor,  # [B, S, Hkv*D]
    past_key: torch.Tensor,  # [B, Hkv, C, D] cache buffer (C = capacity)
    past_value: torch.Tensor,  # [B, Hkv, C, D]
    seqlens_k: torch.Tensor,  # [B] int32: tokens in the cache after this step, minus one
    total_sequence_length: torch.Tensor,  # [] int32: upper bound of seqlens_k + 1
    cos_cache: torch.Tensor,  # [P, D/2] float32 (YaRN attention factor included)
    sin_cache: torch.Tensor,  # [P, D/2]
    query_seqlens: torch.Tensor,  # [B] int32: valid (left-aligned) rows of this chunk
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal GQA over a KV cache with right-padded chunks, the semantics of ONNX Runtime's
    GroupQueryAttention with ``query_seqlens``: row s of entry b sits at absolute position
    P + s where P = seqlens_k[b] + 1 - query_seqlens[b]; its key/value are written to the cache
    at that position; it attends to cache positions [0, P + s]. Padding rows give zeros."""
    B, S, _ = query.shape
    D = past_key.shape[-1]
    group = num_heads // kv_num_heads
    out = torch.zeros_like(query)
    present_key, present_value = past_key.clone(), past_value.clone()
    for b in range(B):
        T, Q = int(seqlens_k[b]) + 1, int(query_seqlens[b])
        P = T - Q
        if Q == 0:
            continue
        pos = torch.arange(P, T)
        cos, sin = cos_cache[pos].to(query.dtype), sin_cache[pos].to(query.dtype)  # [Q, D/2]
        q = rotate(query[b, :Q].view(Q, num_heads, D).transpose(0, 1), cos, sin)  # [Hq, Q, D]
        k = rotate(key[b, :Q].view(Q, kv_num_heads, D).transpose(0, 1), cos, sin)  # [Hkv, Q, D]
        v = value[b, :Q].view(Q, kv_num_heads, D).transpose(0, 1)
        present_key[b, :, P:T] = k
        present_value[b, :, P:T] = v
        keys = present_key[b, :, :T].repeat_interleave(group, dim=0)  # [Hq, T, D]
        values = present_value[b, :, :T].repeat_interleave(group, dim=0)
        scores = (q.float() @ keys.float().transpose(1, 2)) * scale  # [Hq, Q, T]
        causal = torch.arange(T)[None, :] <= pos[:, None]  # [Q, T]
        scores = scores.masked_fill(~causal, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ values.float()  # [Hq, Q, D]
        out[b, :Q] = o.transpose(0, 1).reshape(Q, num_heads * D).to(query.dtype)
    return out, present_key, present_value


@attention.register_fake
def _(query, key, value, past_key, past_value, *args, **kwargs):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("qmoe::moe_block", mutates_args=())
def moe_block(
    hidden: torch.Tensor,  # [T, H]
    router_weight: torch.Tensor,  # [E, H]
    gate_up_weight: torch.Tensor,  # [E, 2I, H]: gate rows then up rows, interleaved g0,u0,g1,u1..., or blocks
    down_weight: torch.Tensor,  # [E, H, I]
    shared_gate_up_weight: torch.Tensor,  # [2Is, H]: gate rows then up rows, or blocks
    shared_down_weight: torch.Tensor,  # [H, Is]
    shared_expert_gate_weight: torch.Tensor,  # [1, H]
    top_k: int,
    norm_topk_prob: bool,
    interleaved: bool,
    gate_up_block: int,
) -> torch.Tensor:
    """Qwen2-MoE sparse block, as transformers' Qwen2MoeSparseMoeBlock computes it:
    fp32 softmax over all experts, top-k, optional renormalisation, SwiGLU experts, weighted sum,
    plus sigmoid(shared_expert_gate(x)) * shared_expert(x). Gate/up rows: `interleaved` (routed
    experts, ONNX Runtime's MoE) alternates single rows; `gate_up_block` b > 0 (routed and shared
    expert, the QmoeRoutedExperts plugin's field) alternates blocks of b rows; else gate rows then up."""
    probs = torch.softmax(F.linear(hidden, router_weight).float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(hidden.dtype)
    out = torch.zeros_like(hidden)
    for e in experts.unique().tolist():
        rows, slot = torch.where(experts == e)
        gu = F.linear(hidden[rows], gate_up_weight[e])  # [n, 2I]
        gate, up = (gu[:, 0::2], gu[:, 1::2]) if interleaved else split_gate_up(gu, gate_up_block)
        y = F.linear(F.silu(gate) * up, down_weight[e])
        out.index_add_(0, rows, y * weights[rows, slot, None])
    sg, su = split_gate_up(F.linear(hidden, shared_gate_up_weight), gate_up_block)
    shared = F.linear(F.silu(sg) * su, shared_down_weight)
    return out + torch.sigmoid(F.linear(hidden, shared_expert_gate_weight)) * shared


def split_gate_up(gu: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) columns of a gate/up product [n, 2N] whose weight rows are gate then up (block 0)
    or alternate in blocks of `block` rows."""
    if block == 0:
        g, u = gu.chunk(2, dim=-1)
        return g, u
    v = gu.unflatten(-1, (-1, 2, block))  # [n, N / b, gate|up, b]
    return v[..., 0, :].flatten(-2), v[..., 1, :].flatten(-2)


@moe_block.register_fake
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)
