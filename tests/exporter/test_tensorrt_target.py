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


@pytest.fixture(scope="module")
def trt_blocked_artifact(tiny_checkpoint, tmp_path_factory):
    """Gate/up rows in blocks of 16 (the tiny model's I = 32 and Is = 64 do not take the default 128)."""
    return export(tiny_checkpoint, tmp_path_factory.mktemp("trt16") / "art", target="tensorrt", dtype="float16",
                  gate_up_block=16)


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
                                 shared_intermediate_size=64, gate_up_block=0)  # 128 does not divide 32
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
             norm_topk_prob=None, moe_intermediate_size=None, shared_intermediate_size=None, gate_up_block=None,
             plugin_version=None, plugin_namespace=None):
        silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731

        def concatenated(w):  # [..., 2N, H] from gate_up_block's layout to gate rows then up rows
            if not gate_up_block:
                return w
            *lead, two_n, h = w.shape
            blocks = w.reshape(*lead, two_n // (2 * gate_up_block), 2, gate_up_block, h)
            return np.swapaxes(blocks, -4, -3).reshape(w.shape)

        gate_up, s_gate_up = concatenated(gate_up), concatenated(s_gate_up)
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


def test_gate_up_block_choice(tiny_checkpoint, tmp_path, monkeypatch):
    """Gate rows then up rows by default (TRT_GATE_UP_BLOCK 0 until 128-row blocks, SwiGLU in the
    Hopper GEMM 1's epilogue, have run on a GPU); a default block applies where both intermediate
    sizes allow it; a requested layout is checked; ONNX Runtime's graph has its own."""
    from dataclasses import replace

    from exporter import export as ex
    from exporter.checkpoint import Checkpoint
    from exporter.export import ExportError, gate_up_block_for

    c = Checkpoint(tiny_checkpoint).config
    big = replace(c, moe_intermediate_size=2560, shared_expert_intermediate_size=20480)
    assert ex.TRT_GATE_UP_BLOCK == 0 and gate_up_block_for(big, "tensorrt", None) == 0
    assert gate_up_block_for(big, "tensorrt", 128) == 128  # qmoe export --gate-up-block 128
    monkeypatch.setattr(ex, "TRT_GATE_UP_BLOCK", 128)
    assert gate_up_block_for(big, "tensorrt", None) == 128
    assert gate_up_block_for(replace(big, shared_expert_intermediate_size=20480 + 64), "tensorrt", None) == 0
    assert gate_up_block_for(c, "tensorrt", None) == 0  # I = 32
    monkeypatch.undo()
    for odd in (128.0, "16", True):
        with pytest.raises(ExportError, match="gate_up_block must be an integer"):
            gate_up_block_for(big, "tensorrt", odd)
    assert gate_up_block_for(c, "tensorrt", None) == 0 and gate_up_block_for(c, "tensorrt", 32) == 32
    assert gate_up_block_for(c, "onnxruntime", None) == 0
    for bad in (12, 48, -8):
        with pytest.raises(ExportError, match=f"gate_up_block {bad}: need 0 or a multiple of 8"):
            gate_up_block_for(c, "tensorrt", bad)
    with pytest.raises(ExportError, match="gate_up_block 64: need"):
        export(tiny_checkpoint, tmp_path / "x", target="tensorrt", dtype="float16", gate_up_block=64)
    with pytest.raises(ExportError, match="tensorrt target"):
        export(tiny_checkpoint, tmp_path / "y", gate_up_block=16)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    from click.testing import CliRunner

    from runtime.cli import main

    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "z"), "--target",
                                       "tensorrt", "--gate-up-block", "24"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "gate_up_block 24: need" in result.stderr
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("artifact", ["trt_artifact", "trt_blocked_artifact"])
def test_reference_evaluation_matches_transformers(artifact, tiny_checkpoint, request):
    """Prefill of a ragged batch of 2, then one decode step, through the fp16 tensorrt graph vs
    transformers in fp32: logits |delta| <= 5e-2 (fp16 compute, unit-scale logits), same argmax.
    Both gate/up layouts: the numpy plugin reads the rows as the node's gate_up_block says."""
    trt_artifact = request.getfixturevalue(artifact)
    if artifact == "trt_blocked_artifact":
        m = onnx.load(str(trt_artifact / "model.onnx"), load_external_data=False)
        blocks = [onnx.helper.get_attribute_value(a) for n in _plugin_nodes(m) for a in n.attribute
                  if a.name == "gate_up_block"]
        assert blocks == [16, 16]
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


def test_blocked_shared_expert_is_written_in_bounded_pieces(tiny_checkpoint, monkeypatch):
    """The shared expert's gate/up rows in blocks come from the checkpoint a row range at a time (a
    whole number of blocks, about PIECE_BYTES) and add up to the blocked layout of the whole tensors."""
    from exporter import weights
    from exporter.checkpoint import Checkpoint

    ck = Checkpoint(tiny_checkpoint)
    prefix = "model.layers.0.mlp.shared_expert"
    gate, up = ck.rows(f"{prefix}.gate_proj.weight", 0, 64), ck.rows(f"{prefix}.up_proj.weight", 0, 64)
    row_bytes = gate[0].numel() * gate.element_size()
    monkeypatch.setattr(weights, "PIECE_BYTES", 2 * 24 * row_bytes)  # 24 rows of each: 16-row blocks -> 16
    got = list(weights.pieces(ck, f"{prefix}.gate_up", False, 16))
    assert [p.shape[0] for p in got] == [32] * 4  # 16 gate + 16 up rows each
    assert torch.equal(torch.cat(got), weights.blocked(gate, up, 16))
    monkeypatch.setattr(weights, "PIECE_BYTES", 2 * 48 * row_bytes)  # 48 rows of each, then the last 16
    got = list(weights.pieces(ck, f"{prefix}.gate_up", False, 8))
    assert [p.shape[0] for p in got] == [96, 32]
    assert torch.equal(torch.cat(got), weights.blocked(gate, up, 8))
    whole = weights.blocked(gate, up, 16).reshape(4, 2, 16, -1)
    assert torch.equal(whole[:, 0].reshape(64, -1), gate) and torch.equal(whole[:, 1].reshape(64, -1), up)
