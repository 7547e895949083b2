"""The export model run in torch with the custom ops' reference implementations: the semantics
the ONNX nodes must match, checked against transformers and against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from exporter.checkpoint import Checkpoint
from exporter.model import Qwen2MoeForExport
from exporter.weights import load_into
from runtime.manifest import io_names
from tests.helpers import hf_model, rope_cache


@pytest.mark.parametrize("interleaved, gate_up_block", [(True, 0), (False, 0), (False, 8), (False, 32)],
                         ids=["pairs", "concatenated", "blocks8", "blocks32"])
def test_reference_ops_match_transformers_and_onnxruntime(tiny_checkpoint, tiny_artifact, interleaved, gate_up_block):
    """Every gate/up row layout the exporter writes (ONNX Runtime's pairs, the plugin's blocks; 32 is
    the tiny model's whole routed intermediate size, so the shared expert's 64 rows alternate twice)."""
    ck = Checkpoint(tiny_checkpoint)
    c = ck.config
    model = Qwen2MoeForExport(c, torch.float32, torch.float32, interleaved_experts=interleaved,
                              gate_up_block=gate_up_block)
    load_into(model, ck, interleaved, gate_up_block)
    prompts = [[9707, 11, 1879, 0, 220], [151644, 872, 198]]
    B, S, C = 2, 5, 8
    lengths = torch.tensor([5, 3], dtype=torch.int32)
    ids = torch.zeros(B, S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    cos, sin = (torch.from_numpy(t) for t in rope_cache(c.head_dim, c.rope_theta, C))
    past = [torch.zeros(B, c.num_key_value_heads, C, c.head_dim) for _ in range(2 * c.num_hidden_layers)]
    with torch.no_grad():
        out = model(ids, lengths, lengths - 1, torch.tensor(C, dtype=torch.int32), cos, sin,
                    (lengths - 1).long()[:, None], *past)
        hf = hf_model(tiny_checkpoint)
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1]
            assert (out[0][i, 0] - ref).abs().max() <= 1e-4
        # one decode step through the reference cache vs ONNX Runtime's GroupQueryAttention
        nxt = out[0][:, 0].argmax(-1)
        step = (nxt[:, None], torch.ones(B, dtype=torch.int32), lengths, torch.tensor(C, dtype=torch.int32), cos, sin,
                torch.zeros(B, 1, dtype=torch.long))
        out2 = model(*step, *out[1:])
    sess = runtime.load(tiny_artifact).backend.session
    feeds = dict(zip(io_names(c.num_hidden_layers).inputs, [t.numpy() for t in step] + [t.numpy() for t in out[1:]]))
    ort_logits = sess.run(["logits"], feeds)[0]
    assert np.abs(ort_logits - out2[0].numpy()).max() <= 1e-4
