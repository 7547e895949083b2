"""Deterministic random Qwen2-MoE checkpoints in the exact Hugging Face on-disk layout.

Used as the embedded default model (`qmoe tiny`), by the tests and by the benchmarks. Shards are
generated and written one at a time, so a multi-GB checkpoint needs about one shard of memory.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

from runtime.config import ModelConfig

from .atomic import atomic_dir
from .checkpoint import INDEX_NAME, Checkpoint
from .export import DTYPES

# The embedded default: the real vocabulary and tokenizer and every architectural feature of
# Qwen2-57B-A14B (GQA, qkv bias, routed + gated shared experts, norm_topk_prob=false), tiny dims.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "vocab_size": 151936,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "float32",
}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "do_sample": False,
}

def tiny_config(**overrides: Any) -> dict[str, Any]:
    return {**TINY_CONFIG, **overrides}


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: Any) -> Any:
    """Each tensor from its own seeded generator: values do not depend on sharding or order."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        std, mean = 0.1, 1.0
    elif name.endswith(".bias"):
        std, mean = 0.1, 0.0
    elif name == "model.embed_tokens.weight":
        std, mean = 1.0, 0.0
    else:
        # Unit-scale activations everywhere, so logits and router scores are well separated
        # (greedy parity tests need no near-ties) and nothing overflows in fp16.
        std, mean = 1.0 / math.sqrt(max(shape[-1], 1)), 0.0  # a 0-wide shared expert has empty weights
    return (torch.randn(shape, generator=g) * std + mean).to(dtype)


def write_checkpoint(
    out_dir: str | Path,
    hf_config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "float32",
    shard_bytes: int | None = None,
    tokenizer: bool = True,
    force: bool = False,
) -> Path:
    """Writes config, generation config, >=2 safetensors shards + index, and the Qwen2 tokenizer."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = ModelConfig.from_hf_dict(hf_config, source="<tiny config>")
    tdtype = getattr(torch, dtype)
    shapes = Checkpoint.expected_shapes_for(config, fused=False)
    sizes = {n: math.prod(s) * tdtype.itemsize for n, s in shapes.items()}
    total = sum(sizes.values())
    limit = shard_bytes or total // 2 + 1  # at least two shards, like every real checkpoint

    plan: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if plan[-1] and used + nbytes > limit:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += nbytes

    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": dtype}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        for i, names in enumerate(plan):
            fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            shard = {n: _random_tensor(n, shapes[n], seed, tdtype) for n in names}
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer:
            from .qwen_tokenizer import write_tokenizer_files

            write_tokenizer_files(tmp)
    return Path(out_dir)
