"""Attention for the tensorrt target: the QmoeRotary plugin plus opset-18 ops that the TensorRT
ONNX parser supports, with the same graph interface and semantics as GroupQueryAttention
(shared KV buffer, right-padded chunks, positions from seqlens_k and query_seqlens).

    [positions = seqlens_k + 1 - query_seqlens + s] -> [QmoeRotary(q, k)]
        -> [ScatterND new k/v rows into the cache] -> [GQA scores over the cache, causal mask]
        -> [Softmax] -> [weighted values]

Unlike ONNX Runtime's fused op, this reads the whole cache capacity each step (masked), and the
ScatterND output is a new tensor in ONNX semantics (TensorRT may or may not write it in place).
The runtime allocates one spare cache row so that idle rows' writes stay inside the buffer.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from runtime import contract

from .translations import trt

_I64 = 7  # onnx.TensorProto.INT64
_F32 = 1


def _c(*values: int):
    return op.Constant(value_ints=list(values))


def trt_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
                  sin_cache, query_seqlens, num_heads: int, kv_num_heads: int, scale: float):
    spec = contract.ROTARY
    D = past_key.shape[3]
    assert isinstance(D, int), "head_dim must be static"
    group = num_heads // kv_num_heads
    T = int(query.dtype)  # compute dtype (onnx TensorProto enum); CastLike is avoided for older parsers
    q_shape = op.Shape(query)
    B = op.Shape(query, start=0, end=1)  # [1]
    S = op.Shape(query, start=1, end=2)
    C = op.Shape(past_key, start=2, end=3)

    # absolute positions [B, S]: P_b + s with P_b = seqlens_k + 1 - query_seqlens
    start = op.Sub(op.Add(op.Cast(seqlens_k, to=_I64), op.Constant(value_int=1)), op.Cast(query_seqlens, to=_I64))
    steps = op.Range(op.Constant(value_int=0), op.Squeeze(op.Cast(S, to=_I64)), op.Constant(value_int=1))  # [S]
    positions = op.Add(op.Unsqueeze(start, _c(1)), op.Unsqueeze(steps, _c(0)))  # [B, S]

    q_rot, k_rot = getattr(trt, spec.name)(
        # the plugin reads fp32 tables (contract); the graph's tables are in the compute dtype
        query, key, op.Cast(cos_cache, to=_F32), op.Cast(sin_cache, to=_F32), positions, plugin_version=spec.version,
        plugin_namespace=spec.namespace, num_heads=num_heads, num_kv_heads=kv_num_heads, head_dim=D, _outputs=2,
    )

    # new rows -> cache rows `positions` of every kv head (ScatterND indices [B, Hkv, S, 3])
    k_new = op.Transpose(op.Reshape(k_rot, op.Concat(B, S, _c(kv_num_heads, D), axis=0)), perm=[0, 2, 1, 3])
    v_new = op.Transpose(op.Reshape(value, op.Concat(B, S, _c(kv_num_heads, D), axis=0)), perm=[0, 2, 1, 3])
    idx_shape = op.Concat(B, _c(kv_num_heads), S, _c(1), axis=0)
    b_idx = op.Expand(op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(op.Cast(B, to=_I64)),
                                          op.Constant(value_int=1)), _c(-1, 1, 1, 1)), idx_shape)
    h_idx = op.Expand(op.Reshape(op.Range(op.Constant(value_int=0), op.Constant(value_int=kv_num_heads),
                                          op.Constant(value_int=1)), _c(1, -1, 1, 1)), idx_shape)
    s_idx = op.Expand(op.Unsqueeze(op.Unsqueeze(positions, _c(1)), _c(3)), idx_shape)
    indices = op.Concat(b_idx, h_idx, s_idx, axis=3)  # [B, Hkv, S, 3]
    present_key = op.ScatterND(past_key, indices, k_new)
    present_value = op.ScatterND(past_value, indices, v_new)

    # scores [B, Hkv, G*S, C]: queries of one kv group stacked along the row axis
    q = op.Transpose(op.Reshape(q_rot, op.Concat(B, S, _c(kv_num_heads, group, D), axis=0)), perm=[0, 2, 3, 1, 4])
    q = op.Reshape(q, op.Concat(B, _c(kv_num_heads, -1, D), axis=0))  # [B, Hkv, G*S, D]
    scores = op.Mul(op.MatMul(q, op.Transpose(present_key, perm=[0, 1, 3, 2])), op.Cast(op.Constant(value_float=scale), to=T))
    scores = op.Reshape(scores, op.Concat(B, _c(kv_num_heads, group), S, C, axis=0))  # [B, Hkv, G, S, C]
    key_pos = op.Range(op.Constant(value_int=0), op.Squeeze(op.Cast(C, to=_I64)), op.Constant(value_int=1))  # [C]
    allowed = op.LessOrEqual(op.Reshape(key_pos, _c(1, 1, 1, 1, -1)),
                             op.Reshape(positions, op.Concat(B, _c(1, 1), S, _c(1), axis=0)))  # [B,1,1,S,C]
    neg = op.Cast(op.Constant(value_float=-65000.0), to=T)  # finite in fp16 too; exp() underflows to 0
    scores = op.Where(allowed, scores, neg)
    probs = op.Softmax(op.Cast(scores, to=_F32), axis=-1)
    probs = op.Cast(op.Reshape(probs, op.Concat(B, _c(kv_num_heads, -1), C, axis=0)), to=T)  # [B, Hkv, G*S, C]
    out = op.MatMul(probs, present_value)  # [B, Hkv, G*S, D]
    out = op.Reshape(out, op.Concat(B, _c(kv_num_heads, group), S, _c(D), axis=0))
    out = op.Reshape(op.Transpose(out, perm=[0, 3, 1, 2, 4]), q_shape)  # [B, S, Hq*D]
    return out, present_key, present_value
