"""Qwen2-MoE for export: compact torch modules whose forward is the ONNX graph.

Built on the meta device for tracing (no weight is loaded); `load_weights` fills a real copy for
the torch-side parity tests. Parameter names are checkpoint names where a tensor maps 1:1, and
`*.experts.gate_up` / `*.experts.down` / `*.shared_expert.gate_up` for repacked tensors (see
`weights.py`).

Graph interface (onnxruntime target; shapes with B batch, S chunk, C cache capacity, P rope
positions, N logit rows):
    input_ids [B, S] int64, query_seqlens [B] int32, seqlens_k [B] int32,
    total_sequence_length [] int32, cos_cache/sin_cache [P, D/2] float32,
    logits_indices [B, N] int64, past_key_values.{L}.key/value [B, Hkv, C, D]
 -> logits [B, N, V] float32, present.{L}.key/value [B, Hkv, C, D] (same buffer as past: the
    runtime binds both to one preallocated cache, written in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig

from . import ops  # noqa: F401  (registers torch.ops.qmoe.*)


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored [out, in] as in the checkpoint (Gemm transB=1 in ONNX)."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        # 2D so that it exports as one Gemm(transB=1) reading the weight as stored: no Transpose
        # node, and the checkpoint's bytes can back the initializer unchanged.
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight.to(x.dtype), b)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        D = c.head_dim
        self.num_heads, self.kv_heads, self.scale = c.num_attention_heads, c.num_key_value_heads, D**-0.5
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * D, c.qkv_bias, dtype)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * D, c.qkv_bias, dtype)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * D, c.qkv_bias, dtype)
        self.o_proj = Linear(c.num_attention_heads * D, c.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, ctx: dict):
        out, present_k, present_v = torch.ops.qmoe.attention(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), past_k, past_v,
            ctx["seqlens_k"], ctx["total_sequence_length"], ctx["cos_cache"], ctx["sin_cache"],
            ctx["query_seqlens"], self.num_heads, self.kv_heads, self.scale,
        )  # out [B, S, Hq*D]
        return self.o_proj(out), present_k, present_v


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, False, dtype)
        self.up_proj = Linear(hidden, inter, False, dtype)
        self.down_proj = Linear(inter, hidden, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        E, I, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype), requires_grad=False)
        self.down = nn.Parameter(torch.empty(E, H, I, dtype=dtype), requires_grad=False)


class SharedExpert(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        Is, H = c.shared_expert_intermediate_size, c.hidden_size
        self.gate_up = nn.Parameter(torch.empty(2 * Is, H, dtype=dtype), requires_grad=False)
        self.down_proj = Linear(Is, H, False, dtype)


class SparseMoe(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, interleaved: bool, gate_up_block: int = 0) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob, self.interleaved = c.num_experts_per_tok, c.norm_topk_prob, interleaved
        self.gate_up_block = gate_up_block
        self.gate = Linear(c.hidden_size, c.num_experts, False, dtype)  # router
        self.experts = Experts(c, dtype)
        self.shared_expert = SharedExpert(c, dtype)
        self.shared_expert_gate = Linear(c.hidden_size, 1, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        t = x.dtype
        y = torch.ops.qmoe.moe_block(
            x.reshape(B * S, H), self.gate.weight.to(t), self.experts.gate_up.to(t), self.experts.down.to(t),
            self.shared_expert.gate_up.to(t), self.shared_expert.down_proj.weight.to(t),
            self.shared_expert_gate.weight.to(t), self.top_k, self.norm_topk_prob, self.interleaved,
            self.gate_up_block,
        )  # [B*S, H]
        return y.reshape(B, S, H)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int, dtype: torch.dtype, interleaved: bool,
                 gate_up_block: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = Attention(c, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            SparseMoe(c, dtype, interleaved, gate_up_block) if c.is_sparse_layer(layer)
            else DenseMLP(c.hidden_size, c.intermediate_size, dtype)
        )

    def forward(self, x, past_k, past_v, ctx):
        a, present_k, present_v = self.self_attn(self.input_layernorm(x), past_k, past_v, ctx)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present_k, present_v


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, interleaved: bool, gate_up_block: int = 0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(c, i, dtype, interleaved, gate_up_block)
                                    for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)


class Qwen2MoeForExport(nn.Module):
    """`weight_dtype` is what the artifact stores; `compute_dtype` what the graph computes in
    (bf16 weights with fp32 compute for ONNX Runtime's CPU provider, which lacks bf16 kernels)."""

    def __init__(self, c: ModelConfig, weight_dtype: torch.dtype, compute_dtype: torch.dtype,
                 interleaved_experts: bool, gate_up_block: int = 0) -> None:
        super().__init__()
        self.config, self.compute_dtype = c, compute_dtype
        self.model = Backbone(c, weight_dtype, interleaved_experts, gate_up_block)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, False, weight_dtype)

    def forward(self, input_ids, query_seqlens, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                logits_indices, *past):
        ctx = dict(query_seqlens=query_seqlens, seqlens_k=seqlens_k, total_sequence_length=total_sequence_length,
                   cos_cache=cos_cache, sin_cache=sin_cache)
        x = F.embedding(input_ids, self.model.embed_tokens.weight).to(self.compute_dtype)  # [B, S, H]
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, pk, pv = layer(x, past[2 * i], past[2 * i + 1], ctx)
            presents += [pk, pv]
        B, N = logits_indices.shape
        # Only the rows asked for reach the vocabulary projection: a 32k prompt costs [B, 1, V].
        rows = torch.gather(x, 1, logits_indices.unsqueeze(-1).expand(B, N, x.shape[-1]))  # [B, N, H]
        h = self.model.norm(rows)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(h.reshape(B * N, -1), head.to(h.dtype)).float().reshape(B, N, -1)  # [B, N, V]
        return (logits, *presents)
