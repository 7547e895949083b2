"""The torch reference of the GPU tests against transformers' Qwen2MoeSparseMoeBlock (CPU, float32).

The kernels are checked against ``moe_reference``; this makes sure that reference is transformers'
math (routing, renormalisation, SwiGLU layout of gate_up, shared-expert gate), including the
contract's weight layout.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.plugins import moe_reference as ref  # noqa: E402


@pytest.mark.parametrize("shape", [ref.ODD_SMALL, ref.E64_TOP8], ids=["odd_small", "e64_top8"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "skewed"])
def test_reference_matches_transformers(shape: ref.MoeShape, norm: bool, skew: bool) -> None:
    w = ref.make_weights(shape, torch.float32, "cpu", favoured=shape.top_k + 2 if skew else None)
    x = ref.make_hidden(37, shape.hidden, torch.float32, "cpu", skew=skew)
    with torch.no_grad():
        expected = ref.transformers_forward(ref.to_transformers_block(shape, w, norm), x).double()
    r = ref.route(x, w, shape.top_k, norm)
    got = ref.experts(x, w, r.ids, r.weights, r.shared_gate)
    scale = expected.abs().max().item()
    assert scale > 0.1  # outputs of order 1: a zero output would not test anything
    assert (got - expected).abs().max().item() < 1e-4 * scale
    if skew:
        assert len(torch.unique(r.ids)) <= shape.top_k + 2  # most experts really get no tokens
    # Perturbing the routing must be visible: the comparison above can fail.
    other = ref.experts(x, w, r.ids.flip(-1), r.weights, r.shared_gate)
    if not norm or shape.top_k > 1:
        assert (other - expected).abs().max().item() > 1e-3 * scale


def test_reference_rotary_matches_transformers() -> None:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import apply_rotary_pos_emb

    from runtime.yarn import default_inv_freq, rope_tables

    B, S, Hq, Hkv, D, P = 2, 5, 4, 2, 16, 32
    cos, sin = (torch.from_numpy(t) for t in rope_tables(default_inv_freq(D, 10000.0), 1.0, P))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, Hq * D, generator=g)
    k = torch.randn(B, S, Hkv * D, generator=g)
    pos = torch.randint(0, P, (B, S), generator=g)
    full_cos = torch.cat([cos, cos], dim=-1)[pos]  # [B, S, D], transformers' layout
    full_sin = torch.cat([sin, sin], dim=-1)[pos]
    hq, hk = apply_rotary_pos_emb(q.view(B, S, Hq, D).transpose(1, 2), k.view(B, S, Hkv, D).transpose(1, 2),
                                  full_cos, full_sin)
    assert torch.allclose(ref.rotary(q, cos, sin, pos, Hq, D).float(), hq.transpose(1, 2).reshape(B, S, -1), atol=1e-5)
    assert torch.allclose(ref.rotary(k, cos, sin, pos, Hkv, D).float(), hk.transpose(1, 2).reshape(B, S, -1), atol=1e-5)


def test_shared_expert_eager_is_the_gated_shared_expert() -> None:
    shape = ref.ODD_SMALL
    w = ref.make_weights(shape, torch.float32, "cpu")
    x = ref.make_hidden(5, shape.hidden, torch.float32, "cpu")
    r = ref.route(x, w, shape.top_k, False)
    expected = ref.experts(x, w, r.ids, torch.zeros_like(r.weights), r.shared_gate)  # routed part weighted 0
    got = ref.shared_expert_eager(x, w).double()
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
