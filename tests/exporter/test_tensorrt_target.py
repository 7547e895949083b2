"""The tensorrt-target graph, checked without TensorRT: onnx.checker, the parser allow-list, the
plugin contract, and numerics through onnx's reference evaluator with numpy implementations of
the two plugins (independent of the torch ops), against transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from exporter.export import export
from exporter.trt_ops import ALLOWED_OPS
from runtime import contract
from runtime.manifest import io_names
from tests.helpers import hf_model, rope_cache


@pytest.fixture(scope="module")
def trt_artifact(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("trt") / "art", target="tensorrt", dtype="float16")


def _plugin_nodes(model):
    return [n for n in model.graph.node if n.domain == contract.PLUGIN_DOMAIN]


def test_checker_allow_list_and_contract(trt_artifact):
    path = trt_artifact / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    standard = {n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx")}
    assert standard <= ALLOWED_OPS, standard - ALLOWED_OPS
    assert {n.domain for n in m.graph.node} <= {"", contract.PLUGIN_DOMAIN}
    assert not any(f.name in {s.name for s in contract.PLUGINS} for f in m.functions)  # parser would inline it
    specs = {s.name: s for s in contract.PLUGINS}
    nodes = _plugin_nodes(m)
    L = 2  # tiny: 2 layers, both sparse
    assert sorted(n.op_type for n in nodes) == ["QmoeRotary"] * L + ["QmoeRoutedExperts"] * L
    for n in nodes:
        spec = specs[n.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.pop("plugin_version") == spec.version.encode()
        assert attrs.pop("plugin_namespace") == spec.namespace.encode()
        assert sorted(attrs) == sorted(f.name for f in spec.fields)  # the creators match fields by name
        assert len(n.input) == len(spec.inputs) and len(n.output) == len(spec.outputs)
        if n.op_type == "QmoeRoutedExperts":
            assert attrs == dict(num_experts=8, top_k=2, norm_topk_prob=0, moe_intermediate_size=32,
                                 shared_intermediate_size=64)
            inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
            assert inits[n.input[2]] == (8, 64, 64) and inits[n.input[3]] == (8, 64, 32)  # [E, 2I, H], [E, H, I]
        else:
            assert attrs == dict(num_heads=4, num_kv_heads=2, head_dim=16)
    assert [i.name for i in m.graph.input] == io_names(L).inputs


# --- numpy plugins for onnx's reference evaluator -------------------------------------------

class QmoeRotary(OpRun):
    op_domain = contract.PLUGIN_DOMAIN

    def _run(self, query, key, cos, sin, position_ids, num_heads=None, num_kv_heads=None, head_dim=None,
             plugin_version=None, plugin_namespace=None):
        def rot(x, heads):
            B, S, _ = x.shape
            x = x.reshape(B, S, heads, head_dim)
            c, s = cos[position_ids][:, :, None], sin[position_ids][:, :, None]  # [B, S, 1, D/2]
            x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
            return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(B, S, -1).astype(x.dtype)

        return rot(query, num_heads), rot(key, num_kv_heads)


class QmoeRoutedExperts(OpRun):
    op_domain = contract.PLUGIN_DOMAIN

    def _run(self, x, router, gate_up, down, s_gate_up, s_down, s_gate, num_experts=None, top_k=None,
             norm_topk_prob=None, moe_intermediate_size=None, shared_intermediate_size=None, plugin_version=None,
             plugin_namespace=None):
        silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
        logits = (x @ router.T).astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
        w = np.take_along_axis(p, top, -1)
        if norm_topk_prob:
            w /= w.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        I = moe_intermediate_size
        for t in range(x.shape[0]):
            for j, e in enumerate(top[t]):
                gu = gate_up[e] @ x[t]
                out[t] += w[t, j] * (down[e] @ (silu(gu[:I]) * gu[I:]))
        gu = x @ s_gate_up.T
        Is = shared_intermediate_size
        shared = (silu(gu[:, :Is]) * gu[:, Is:]) @ s_down.T
        return (out + shared / (1 + np.exp(-(x @ s_gate.T)))).astype(x.dtype),


def test_float32_is_refused(tiny_checkpoint, tmp_path):
    from exporter.export import ExportError

    with pytest.raises(ExportError, match="use --dtype float16 or --dtype bfloat16"):
        export(tiny_checkpoint, tmp_path / "x", target="tensorrt", dtype="float32")
    assert not (tmp_path / "x").exists()


def test_reference_evaluation_matches_transformers(trt_artifact, tiny_checkpoint):
    """Prefill of a ragged batch of 2, then one decode step, through the fp16 tensorrt graph vs
    transformers in fp32: logits |delta| <= 5e-2 (fp16 compute, unit-scale logits), same argmax."""
    sess = ReferenceEvaluator(str(trt_artifact / "model.onnx"), new_ops=[QmoeRotary, QmoeRoutedExperts])
    hf = hf_model(tiny_checkpoint)
    prompts = [[9707, 11, 1879, 0, 220], [151644, 872, 198]]
    B, S, C = 2, 5, 8
    cos, sin = (t.astype(np.float16) for t in rope_cache(16, 1e6, 64))
    lengths = np.array([5, 3], np.int32)
    ids = np.zeros((B, S), np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    past = {n: np.zeros((B, 2, C, 16), np.float16) for n in io_names(2).inputs[7:]}
    feeds = dict(input_ids=ids, query_seqlens=lengths, seqlens_k=lengths - 1, total_sequence_length=np.array(C, np.int32),
                 cos_cache=cos, sin_cache=sin, logits_indices=(lengths - 1)[:, None].astype(np.int64), **past)
    out = sess.run(None, feeds)
    nxt = out[0][:, 0].argmax(-1)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1].numpy()
            assert np.abs(out[0][i, 0] - ref).max() <= 5e-2 and out[0][i, 0].argmax() == ref.argmax()
    feeds.update(input_ids=nxt[:, None], query_seqlens=np.ones(B, np.int32), seqlens_k=lengths,
                 logits_indices=np.zeros((B, 1), np.int64), **dict(zip(io_names(2).inputs[7:], out[1:])))
    out2 = sess.run(None, feeds)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p + [int(nxt[i])]])).logits[0, -1].numpy()
            assert np.abs(out2[0][i, 0] - ref).max() <= 5e-2 and out2[0][i, 0].argmax() == ref.argmax()
