"""ONNX translations of the custom ops, one table per export target.

onnxruntime: attention -> com.microsoft::GroupQueryAttention (rotary inside, KV cache shared
             between past and present), moe_block -> router Gemm + com.microsoft::MoE (SwiGLU,
             interleaved fc1) + shared-expert Gemms.
tensorrt:    moe_block -> one QmoeRoutedExperts plugin node; attention -> QmoeRotary plugin node
             + opset ops (see tensorrt_attention), contract in runtime/contract.py.
"""

from __future__ import annotations

from typing import Any, Callable

import onnxscript
from onnxscript import opset18 as op

from runtime import contract

from . import schemas  # noqa: F401  (registers com.microsoft and plugin schemas with onnx)

msft = onnxscript.values.Opset("com.microsoft", 1)
trt = onnxscript.values.Opset(contract.PLUGIN_DOMAIN, 1)


def ort_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                  sin_cache, query_seqlens, num_heads: int, kv_num_heads: int, scale: float):
    # GroupQueryAttention inputs, in order; the two empty names are position_ids, attention_bias,
    # head_sink, k_scale, v_scale, q_norm_weight, k_norm_weight (unused) before query_seqlens.
    return msft.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        None, None, None, None, None, None, None, query_seqlens,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
        _outputs=3,
    )


def _gemm_t(x, w):
    return op.Gemm(x, w, transB=1)


def ort_moe_block(hidden, router_weight, gate_up_weight, down_weight, shared_gate_up_weight, shared_down_weight,
                  shared_expert_gate_weight, top_k: int, norm_topk_prob: bool, interleaved: bool,
                  gate_up_block: int = 0):
    assert interleaved, "com.microsoft::MoE on CPU needs interleaved SwiGLU weights"
    assert gate_up_block == 0, "the shared expert's Split takes gate rows then up rows"
    router_logits = _gemm_t(hidden, router_weight)  # [T, E]; MoE applies the softmax itself
    routed = msft.MoE(
        hidden, router_logits, gate_up_weight, None, down_weight,
        k=top_k, normalize_routing_weights=int(norm_topk_prob), activation_type="swiglu",
        swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
    )
    gate_up = _gemm_t(hidden, shared_gate_up_weight)  # [T, 2Is]
    g, u = op.Split(gate_up, num_outputs=2, axis=-1)
    shared = _gemm_t(op.Mul(op.Mul(g, op.Sigmoid(g)), u), shared_down_weight)
    gate = op.Sigmoid(_gemm_t(hidden, shared_expert_gate_weight))  # [T, 1]
    return op.Add(routed, op.Mul(gate, shared))


def trt_moe_block(hidden, router_weight, gate_up_weight, down_weight, shared_gate_up_weight, shared_down_weight,
                  shared_expert_gate_weight, top_k: int, norm_topk_prob: bool, interleaved: bool,
                  gate_up_block: int = 0):
    assert not interleaved, "the QmoeRoutedExperts plugin takes gate/up rows in blocks (gate_up_block), not pairs"
    spec = contract.ROUTED_EXPERTS
    E = _static_dim(router_weight, 0)
    I = _static_dim(down_weight, 2)
    Is = _static_dim(shared_down_weight, 1)
    fields = dict(num_experts=E, top_k=top_k, norm_topk_prob=int(norm_topk_prob), moe_intermediate_size=I,
                  shared_intermediate_size=Is, gate_up_block=gate_up_block)
    assert tuple(fields) == tuple(f.name for f in spec.fields)
    return getattr(trt, spec.name)(
        hidden, router_weight, gate_up_weight, down_weight, shared_gate_up_weight, shared_down_weight,
        shared_expert_gate_weight, plugin_version=spec.version, plugin_namespace=spec.namespace, **fields,
    )


def _static_dim(value: Any, axis: int) -> int:
    d = value.shape[axis]
    if not isinstance(d, int):
        raise ValueError(f"expected a static dimension {axis} of {value.name}, got {d}")
    return d


def table(target: str) -> dict[Callable, Callable]:
    import torch

    from . import ops  # noqa: F401

    if target == "onnxruntime":
        return {torch.ops.qmoe.attention.default: ort_attention, torch.ops.qmoe.moe_block.default: ort_moe_block}
    if target == "tensorrt":
        from .trt_attention import trt_attention

        return {torch.ops.qmoe.attention.default: trt_attention, torch.ops.qmoe.moe_block.default: trt_moe_block}
    raise ValueError(f"unknown target {target!r}")
