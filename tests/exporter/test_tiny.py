"""`qmoe tiny`: the embedded default checkpoint, loaded by transformers itself."""

from __future__ import annotations

import hashlib
import json

import torch

from exporter.tiny import tiny_config, write_checkpoint


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_transformers_loads_model_and_tokenizer(tiny_checkpoint):
    import transformers

    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert len(list(tiny_checkpoint.glob("model-*-of-*.safetensors"))) >= 2
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    assert tok("Hello, world! 你好")["input_ids"] == [9707, 11, 1879, 0, 220, 108386]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    # every tensor came from the checkpoint (none left at transformers' random init)
    from safetensors import safe_open

    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.shared_expert_gate.weight"
    with safe_open(str(tiny_checkpoint / index[name]), framework="pt") as f:
        assert torch.equal(model.state_dict()[name], f.get_tensor(name))
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]


def test_deterministic_per_seed(tmp_path):
    cfg = tiny_config()
    a = write_checkpoint(tmp_path / "a", cfg, seed=1, tokenizer=False)
    b = write_checkpoint(tmp_path / "b", cfg, seed=1, tokenizer=False)
    c = write_checkpoint(tmp_path / "c", cfg, seed=2, tokenizer=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
