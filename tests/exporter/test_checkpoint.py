"""The streaming checkpoint reader on good and bad inputs (each error message asserted)."""

import json
import shutil
import struct

import pytest
import torch

from exporter.checkpoint import Checkpoint, CheckpointError
from exporter.tiny import tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("r") / "ck", tiny_config(), tokenizer=False)


@pytest.fixture
def copy(ck, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ck, d)
    return d


def shard_of(d, name):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_layout_and_lazy_values(ck):
    from safetensors.torch import load_file

    c = Checkpoint(ck)
    assert len(list(ck.glob("*.safetensors"))) >= 2
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    ref = load_file(shard_of(ck, name))[name]
    assert torch.equal(c.tensor(name), ref)
    gate, up, down = c.expert(1, 3)
    assert torch.equal(up, ref) and gate.shape == (32, 64) and down.shape == (64, 32)
    info = c.info(name)
    raw = info.file.read_bytes()[info.offset: info.offset + info.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(32, 64), ref)


def test_single_file_and_fused_expert_layout(ck, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2I, H]) read from one file."""
    from safetensors.torch import save_file

    c = Checkpoint(ck)
    tensors = {}
    for L in range(c.config.num_hidden_layers):
        gu, dn = zip(*[(torch.cat([g, u]), d) for g, u, d in c.experts(L)])
        tensors[f"model.layers.{L}.mlp.experts.gate_up_proj"] = torch.stack(gu)
        tensors[f"model.layers.{L}.mlp.experts.down_proj"] = torch.stack(dn)
    for n in c.tensors:
        if ".mlp.experts." not in n:
            tensors[n] = c.tensor(n)
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(ck / "config.json", d)
    save_file(tensors, str(d / "model.safetensors"))
    f = Checkpoint(d)
    assert f.fused_experts
    for a, b in zip(f.expert(1, 5), c.expert(1, 5)):
        assert torch.equal(a, b)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpoint(tmp_path / "nope")


def test_no_weights(tmp_path, ck):
    shutil.copy(ck / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        Checkpoint(tmp_path)


def test_missing_shard(copy):
    victim = shard_of(copy, "model.norm.weight")
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} \\(holding .*\\) is missing"):
        Checkpoint(copy)


def test_tensor_missing_from_shard(copy):
    idx = copy / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    other = next(f for f in set(d["weight_map"].values()) if f != d["weight_map"]["lm_head.weight"])
    d["weight_map"]["lm_head.weight"] = other
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"{other}: tensor lm_head.weight listed in .* is missing from this shard"):
        Checkpoint(copy)


def test_tensor_missing_from_checkpoint(copy):
    idx = copy / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    del d["weight_map"]["model.layers.0.self_attn.q_proj.bias"]
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="tensor model.layers.0.self_attn.q_proj.bias not found .*config.json"):
        Checkpoint(copy)


def test_shape_mismatch(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts.0.gate_proj.weight has shape \[32, 64\], config.json implies \[16, 64\]"):
        Checkpoint(copy)


def test_truncated_shard(copy):
    victim = shard_of(copy, "model.norm.weight")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated: tensor .* ends at byte"):
        Checkpoint(copy)


def test_corrupt_header(copy):
    victim = shard_of(copy, "model.norm.weight")
    data = bytearray(victim.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    data[8:12] = b"\xff\xfe{["
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(copy)
    victim.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint(copy)
    victim.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        Checkpoint(copy)


def test_unsupported_dtype(copy, tmp_path):
    from safetensors.torch import save_file

    victim = shard_of(copy, "model.norm.weight")
    from safetensors.torch import load_file

    t = load_file(victim)
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)
    save_file(t, str(victim))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype F64; supported: BF16, F16, F32"):
        Checkpoint(copy)


def test_bf16_and_fp16_checkpoints(tmp_path):
    for dt, st in (("bfloat16", "BF16"), ("float16", "F16")):
        c = Checkpoint(write_checkpoint(tmp_path / dt, tiny_config(), dtype=dt, tokenizer=False))
        assert {i.dtype for i in c.tensors.values()} == {st}
        assert c.tensor("model.norm.weight").dtype == getattr(torch, dt)


def _rewrite_header(path, edit):
    """Replaces a shard's JSON header by edit(header), keeping the data bytes."""
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + hlen]))
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])


def _first(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit, message", [
    (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": ["0", "8"]}},
     "shape and data_offsets must be non-negative integers"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [float(x) for x in h[_first(h)]["shape"]]}},
     "shape and data_offsets must be non-negative integers"),
    (lambda h: {**h, "__metadata__": [1]}, "__metadata__ is not one"),
    (lambda h: {k: ({**v, "data_offsets": [v["data_offsets"][0] - 4, v["data_offsets"][1] - 4]}
                    if k != "__metadata__" and v["data_offsets"][0] >= 4 else v) for k, v in h.items()},
     "overlaps another tensor's bytes"),
])
def test_header_values_of_the_wrong_kind(copy, edit, message):
    victim = shard_of(copy, "model.norm.weight")
    _rewrite_header(victim, edit)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        Checkpoint(copy)
    assert message in str(e.value) and str(victim) in str(e.value)


@pytest.mark.parametrize("weight_map", [["a"], {"model.norm.weight": 5}, {"model.norm.weight": ""}])
def test_index_weight_map_of_the_wrong_kind(copy, weight_map):
    index = copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="corrupt index .weight_map must map tensor names to shard files"):
        Checkpoint(copy)
