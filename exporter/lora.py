"""LoRA adapters merged into the weights at export (`qmoe export CK --lora ADAPTER_DIR`).

An adapter is a PEFT LoRA folder: adapter_config.json plus adapter_model.safetensors (or the older
pickled adapter_model.bin, read with torch's weights_only loader). Its tensors are named after
the modules they adapt, with PEFT's `base_model.model.` prefix:

    <linear>.lora_A.weight [r, in]  <linear>.lora_B.weight [out, r]
        any Linear of the model: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj (dense layers),
        mlp.shared_expert.*, mlp.shared_expert_gate, the router mlp.gate, lm_head (untied only),
        and routed experts one by one, mlp.experts.{e}.{gate,up,down}_proj (transformers 4, and
        most published Qwen-MoE adapters)
    model.layers.{L}.mlp.experts[.base_layer].lora_A.weight [r*E, in]  .lora_B.weight [out, r*E]
        PEFT's `target_parameters` on transformers 5's fused experts, gate_up_proj [E, 2I, H] and
        down_proj [E, H, I]: expert e's factors are A.view(E, r, in)[e] and B.view(out, r, E)[..., e].
        Targeting both parameters nests two wrappers; the inner one (`base_layer.`) holds the first
        in the module's parameter order (gate_up_proj), the outer one the other.

Each adapted weight becomes W + scaling * B @ A, scaling = lora_alpha / r (lora_alpha / sqrt(r)
with use_rslora), r and lora_alpha per module from rank_pattern / alpha_pattern as PEFT matches
them. Several adapters add up. The exporter asks for deltas one checkpoint piece at a time
(Checkpoint.rows), so merging costs no more memory than the piece; the sum is formed in float32
and rounded to the artifact's dtype (or quantized) once. Adapter tensors are read lazily and the
few fused-expert factors a layer needs are cached.

Refused with one line: other PEFT methods, DoRA, LoRA biases, modules_to_save, trainable tokens,
embedding LoRA, activated LoRA and the other LoRA variants whose forward is not W + s * B @ A.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from runtime import manifest as mf
from runtime.config import ModelConfig
from runtime.errors import QmoeError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# PEFT settings whose forward is not W + scaling * B @ A (or which carry more than LoRA factors)
REFUSED = {
    "use_dora": "DoRA (a magnitude vector rescales the merged weight)",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights, not Qwen2-MoE's)",
    "modules_to_save": "modules_to_save (whole trained modules stored in the adapter)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA: active only after its invocation tokens)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "block-diagonal LoRA",
    "monteclora_config": "MonteCLoRA",
}
# PEFT's saved embedding layers (save_embedding_layers): whole copies of a targeted (.base_layer) or
# untargeted head or embeddings
_COPY = re.compile(r"(?P<module>lm_head|model\.embed_tokens)(?:\.base_layer)?\.weight")
_KEY = re.compile(r"(?P<module>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight")
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts")
_EXPERT_LINEAR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
FUSED_PARAMS = ("gate_up_proj", "down_proj")  # Qwen2MoeExperts' parameter order (PEFT nests wrappers in it)


class LoraError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class _Pair:
    a: str  # tensor names in the adapter file
    b: str
    r: int
    scaling: float
    experts: int = 1  # fused factors: E, with A [r*E, in] and B [out, r*E]


def _pattern_key(patterns: Sequence[str], key: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of `key` at a name boundary."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


class Adapter:
    """One LoRA adapter folder, validated against a checkpoint's tensors and shapes."""

    def __init__(self, directory: str | Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        """`directory`: the adapter folder, or its weights file (qmoe check names the file it hashed)."""
        weights = Path(directory) if Path(directory).is_file() else None
        if weights is not None and weights.suffix not in (".safetensors", ".bin"):
            raise LoraError(f"{weights}: give the adapter folder (or its .safetensors / .bin weights file)")
        self.dir = Path(directory) if weights is None else weights.parent
        if not self.dir.is_dir():
            raise LoraError(f"{self.dir}: no such LoRA adapter folder")
        cfg_path = self.dir / CONFIG_NAME
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoraError(f"{self.dir}: no {CONFIG_NAME} (not a PEFT adapter folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(f"{cfg_path}: unreadable ({e})") from None
        if not isinstance(cfg, dict):
            raise LoraError(f"{cfg_path}: a JSON object expected")
        self.config = cfg
        kind = cfg.get("peft_type", "LORA")
        if kind != "LORA":
            raise LoraError(f"{cfg_path}: peft_type {kind!r} is not supported; qmoe merges LoRA adapters only")
        if cfg.get("bias", "none") not in ("none", None):  # PEFT saves the biases it trained
            raise LoraError(f"{cfg_path}: bias {cfg['bias']!r} (trained biases) is not supported; qmoe merges plain "
                            "LoRA (W + alpha/r * B A)")
        for field, what in REFUSED.items():
            if cfg.get(field):
                raise LoraError(f"{cfg_path}: {what} is not supported; qmoe merges plain LoRA (W + alpha/r * B A)")
        self.r, self.alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        self.rank_pattern, self.alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        self.rslora = cfg.get("use_rslora", False)
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise LoraError(f"{cfg_path}: {name} is {patterns!r}; expected an object of module name patterns")
            for k in patterns:
                try:
                    re.compile(k)
                except re.error as e:
                    raise LoraError(f"{cfg_path}: {name} key {k!r} is not a regular expression ({e})") from None
        targets = cfg.get("target_parameters") or []
        if not isinstance(targets, list):
            raise LoraError(f"{cfg_path}: target_parameters is {targets!r}; expected a list of parameter names")
        for name, v in (("r", self.r), ("lora_alpha", self.alpha), *((f"rank_pattern[{k!r}]", x)
                                                                     for k, x in self.rank_pattern.items()),
                        *((f"alpha_pattern[{k!r}]", x) for k, x in self.alpha_pattern.items())):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (name.startswith(("r", "rank")) and (v != int(v) or v < 1)):
                raise LoraError(f"{cfg_path}: {name} is {v!r}; expected a " +
                                ("positive integer" if name.startswith(("r", "rank")) else "finite number"))
        if not isinstance(self.rslora, bool):
            raise LoraError(f"{cfg_path}: use_rslora is {self.rslora!r}; expected true or false")
        self.file = weights or next((self.dir / n for n in WEIGHT_NAMES if (self.dir / n).is_file()), None)
        if self.file is None:
            raise LoraError(f"{self.dir}: no {' or '.join(WEIGHT_NAMES)}")
        self._bin: dict | None = None
        # per adapter, so nothing outlives the export: a layer's few fused factors are read once
        self._load = functools.lru_cache(maxsize=8)(self._read_tensor)
        self.tensors = self._read_shapes()
        self.linear: dict[str, _Pair] = {}  # checkpoint weight name (per-expert layout) -> its factors
        self.fused: dict[tuple[int, str], _Pair] = {}  # (layer, gate_up_proj|down_proj) -> fused factors
        self.copies: dict[str, str] = {}  # checkpoint weight -> the adapter's whole copy of it (lm_head)
        self._parse(config, shapes, targets)

    # -- reading ----------------------------------------------------------------------------------

    def _read_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of every tensor in the weights file (a safetensors header is
        validated without reading data; a .bin is loaded, it is small)."""
        from .checkpoint import CheckpointError, _read_header

        assert self.file is not None
        if self.file.suffix == ".safetensors":
            try:
                self._infos = _read_header(self.file)
            except CheckpointError as e:
                raise LoraError(str(e)) from None
            return {n: (t.shape, t.dtype) for n, t in self._infos.items()}
        import torch

        try:
            d = torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (pickle and zip errors of every kind)
            raise LoraError(f"{self.file}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
        if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()):
            raise LoraError(f"{self.file}: not a state dict of named tensors")
        bad = next((k for k, v in d.items() if not v.is_floating_point()), None)
        if bad is not None:
            raise LoraError(f"{self.file}: tensor {bad} has dtype {d[bad].dtype}; LoRA factors are float")
        self._bin = d
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in d.items()}

    def _read_rows(self, name: str, start: int = 0, stop: int | None = None) -> "torch.Tensor":
        """Rows [start, stop) of a tensor, read at its offset (the header parsed once: an adapter
        with a LoRA per expert holds ~10k tensors, and safe_open parses its whole header per call)."""
        if self._bin is not None:
            return self._bin[name][start:stop]
        import torch

        info = self._infos[name]
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else max(start, min(stop, rows))
        row_bytes = info.nbytes // max(rows, 1)
        with open(info.file, "rb") as f:
            f.seek(info.offset + start * row_bytes)
            raw = bytearray(f.read((stop - start) * row_bytes))
        if len(raw) != (stop - start) * row_bytes:
            raise LoraError(f"{info.file}: truncated while reading {name}")
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32}[info.dtype]
        # no bytes is not no rows: a factor of a shared expert of size 0 is [r, 0]
        return torch.frombuffer(raw, dtype=dtype).reshape(stop - start, *info.shape[1:]) if raw else \
            torch.empty((stop - start, *info.shape[1:]), dtype=dtype)

    def _read_tensor(self, name: str) -> "torch.Tensor":
        return self._read_rows(name).float()

    # -- which weights --------------------------------------------------------------------------

    def _rank_alpha(self, key: str) -> tuple[int, float]:
        rk, ak = _pattern_key(list(self.rank_pattern), key), _pattern_key(list(self.alpha_pattern), key)
        r = int(self.rank_pattern[rk] if rk is not None else self.r)
        alpha = float(self.alpha_pattern[ak] if ak is not None else self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)

    def _parse(self, config: ModelConfig, shapes: dict[str, tuple[int, ...]], targets: list) -> None:
        where = self.file
        pairs: dict[tuple[str, int], dict[str, str]] = {}
        tied_head = None
        for name in self.tensors:
            short = name[len(PREFIX):] if name.startswith(PREFIX) else name
            copy = _COPY.fullmatch(short)
            if copy is not None:  # PEFT saves a targeted head whole (save_embedding_layers): it replaces ours
                weight = copy["module"] + ".weight"
                if short == "lm_head.weight" and config.tie_word_embeddings:
                    # a tied model's embeddings saved again under the head's name; PEFT loads that
                    # copy after the embeddings' into the one tensor, so it wins
                    weight, tied_head = "model.embed_tokens.weight", name
                if self.tensors[name][0] != shapes.get(weight):
                    raise LoraError(f"{where}: {name} is {list(self.tensors[name][0])}; the checkpoint's {weight} is "
                                    f"{list(shapes[weight]) if weight in shapes else 'tied to the embeddings'}")
                self.copies[weight] = name
                continue
            m = _KEY.fullmatch(short)
            if m is None:
                what = "an embedding LoRA (lora_embedding_*)" if "lora_embedding_" in name else \
                    "a DoRA magnitude" if "lora_magnitude_vector" in name else "not a LoRA factor"
                raise LoraError(f"{where}: tensor {name} is {what}; qmoe merges lora_A/lora_B pairs of Linear "
                                "layers and experts")
            pairs.setdefault((m["module"], m["nest"].count("base_layer.")), {})[m["ab"]] = name
        if tied_head is not None:
            self.copies["model.embed_tokens.weight"] = tied_head
        if not pairs and not self.copies:
            raise LoraError(f"{where}: no LoRA tensors")
        for (module, depth), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise LoraError(f"{where}: {next(iter(ab.values()))} has no {missing} partner")
            a_shape, b_shape = self.tensors[ab["A"]][0], self.tensors[ab["B"]][0]
            fused = _EXPERTS.fullmatch(module)
            weight = module + ".weight"
            if depth == 0 and len(shapes.get(weight, ())) == 2:  # not a norm's vector
                out_f, in_f = shapes[weight]
                # PEFT matches patterns against the module's name, or the parameter's when a
                # target_parameters entry wrapped it (transformers 5's router, mlp.gate.weight)
                by_param = any(weight == t or weight.endswith(f".{t}") for t in targets if isinstance(t, str))
                r, scaling = self._rank_alpha(weight if by_param else module)
                want_a, want_b, experts, fused_key = (r, in_f), (out_f, r), 1, None
                key = weight
            elif fused is not None and config.is_sparse_layer(int(fused.group(1))):
                layer = int(fused.group(1))
                targeted = [p for p in FUSED_PARAMS if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}")
                                                           for t in targets if isinstance(t, str))]
                if depth >= len(targeted):
                    raise LoraError(f"{where}: {ab['A']} adapts a fused expert parameter, but adapter_config.json's "
                                    f"target_parameters {targets!r} name {len(targeted)} of {module}'s")
                param = targeted[len(targeted) - 1 - depth]  # the outermost wrapper holds the last
                E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
                r, scaling = self._rank_alpha(f"{module}.{param}")
                in_f, out_f = (H, 2 * I) if param == "gate_up_proj" else (I, H)
                want_a, want_b, experts, fused_key = (r * E, in_f), (out_f, r * E), E, (layer, param)
                key = f"{module}.{param}"
            else:
                tied = module == "lm_head" and config.tie_word_embeddings
                raise LoraError(f"{where}: {ab['A']} adapts {module}, " +
                                ("which this checkpoint ties to the embeddings (embedding LoRA is not supported)"
                                 if tied else "which is not a Linear of this Qwen2-MoE checkpoint (an adapter for "
                                 "another model?)"))
            if (a_shape, b_shape) != (want_a, want_b):
                raise LoraError(f"{where}: {key} has lora_A {list(a_shape)} and lora_B {list(b_shape)}; with r={r} "
                                f"(adapter_config.json) the checkpoint implies {list(want_a)} and {list(want_b)}")
            pair = _Pair(ab["A"], ab["B"], r, scaling, experts)
            if fused_key is not None:  # not `experts > 1`: a one-expert model's factors are fused ones too
                self.fused[fused_key] = pair
            else:
                self.linear[key] = pair

    def touched(self) -> set[str]:
        """Checkpoint weights this adapter changes, named in the per-expert layout."""
        names = set(self.linear) | set(self.copies)
        for (layer, param), pair in self.fused.items():
            projs = ("gate", "up") if param == "gate_up_proj" else ("down",)
            names.update(f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"
                         for e in range(pair.experts) for p in projs)
        return names

    # -- deltas -----------------------------------------------------------------------------------

    def copy_rows(self, name: str, start: int, stop: int) -> "torch.Tensor | None":
        """Rows [start, stop) of the adapter's whole copy of checkpoint weight `name`, if it has one."""
        key = self.copies.get(name)
        if key is None:
            return None
        return self._read_rows(key, start, stop)

    def delta(self, name: str, start: int, stop: int) -> "torch.Tensor | None":
        """scaling * B @ A for rows [start, stop) of checkpoint weight `name` (per-expert layout),
        float32; None when this adapter leaves it alone."""
        out = None
        pair = self.linear.get(name)
        if pair is not None:
            a, b = self._load(pair.a), self._load(pair.b)
            out = (b[start:stop] @ a) * pair.scaling
        m = _EXPERT_LINEAR.fullmatch(name)
        if m is not None:
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            pair = self.fused.get((layer, "down_proj" if proj == "down" else "gate_up_proj"))
            if pair is not None:
                E, r = pair.experts, pair.r
                a, b = self._load(pair.a), self._load(pair.b)
                a_e = a.view(E, r, a.shape[-1])[e]  # [r, in]
                b_e = b.view(b.shape[0], r, E)[:, :, e]  # [out, r]
                if proj != "down":
                    rows = b_e.shape[0] // 2
                    b_e = b_e[:rows] if proj == "gate" else b_e[rows:]
                d = (b_e[start:stop] @ a_e) * pair.scaling
                out = d if out is None else out + d
        return out

    def describe(self) -> dict:
        """The manifest's record of this adapter."""
        assert self.file is not None
        return {"path": str(self.dir.absolute()), "file": self.file.name, "sha256": mf.sha256(self.file),
                "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "layers": len(self.linear) + len(self.fused)}


class Adapters:
    """The adapters of one export, summed; deltas named in either expert layout."""

    def __init__(self, dirs: Sequence[str | Path], config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        self.items = [Adapter(d, config, shapes) for d in dirs]
        self.intermediate = config.moe_intermediate_size  # I: gate rows, then up rows in a fused gate_up_proj
        self.names = set().union(*(a.touched() for a in self.items))
        self.fused_names = set()  # transformers 5 / fused-checkpoint names of the experts touched
        for n in self.names:
            m = _EXPERT_LINEAR.fullmatch(n)
            if m is not None:
                self.fused_names.add(f"model.layers.{m.group(1)}.mlp.experts."
                                     f"{'down_proj' if m.group(3) == 'down' else 'gate_up_proj'}")
        copied = [n for a in self.items for n in a.copies]
        if len(copied) != len(set(copied)):
            raise LoraError(f"two adapters each carry a whole copy of {max(copied, key=copied.count)}; merge at most one")

    def _linear(self, name: str, start: int, stop: int) -> "torch.Tensor | None":
        out = None
        for a in self.items:
            d = a.delta(name, start, stop)
            out = d if out is None else out if d is None else out + d
        return out

    def touches(self, name: str) -> bool:
        """Whether checkpoint tensor `name` (either layout) changes."""
        return name in self.names or name in self.fused_names

    def delta(self, name: str, start: int, stop: int, shape: tuple[int, ...]) -> "torch.Tensor | None":
        """The summed delta of rows [start, stop) of checkpoint (or transformers) tensor `name` of
        `shape`, float32, or None. Fused experts: rows are experts."""
        import torch

        if not self.touches(name):
            return None
        m = _FUSED.fullmatch(name)
        if m is None:
            return self._linear(name, start, stop)
        pre, I = f"model.layers.{m.group(1)}.mlp.experts.", self.intermediate
        projs = (("gate", 0), ("up", I)) if m.group(2) == "gate_up_proj" else (("down", 0),)
        out = torch.zeros((max(0, min(stop, shape[0]) - start), *shape[1:]), dtype=torch.float32)
        for i, e in enumerate(range(start, min(stop, shape[0]))):
            for proj, row in projs:
                d = self._linear(f"{pre}{e}.{proj}_proj.weight", 0, shape[1] if proj == "down" else I)
                if d is not None:
                    out[i, row:row + d.shape[0]] += d
        return out

    def apply(self, name: str, base: "torch.Tensor", start: int) -> "torch.Tensor":
        """`base` (rows from `start` of tensor `name`) with the deltas added: float32 when any."""
        base = next((c for c in (a.copy_rows(name, start, start + base.shape[0]) for a in self.items)
                     if c is not None), base)
        d = self.delta(name, start, start + base.shape[0], (start + base.shape[0], *base.shape[1:]))
        return base if d is None else base.float() + d

    def describe(self) -> list[dict]:
        return [a.describe() for a in self.items]


def merge_into(model: "torch.nn.Module", adapters: Adapters) -> int:
    """Adds the deltas to a transformers Qwen2-MoE model's parameters in place (qmoe check's
    reference; its parameter names are checkpoint names in either expert layout); returns how many
    changed."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapters.touches(name):
                p.copy_(adapters.apply(name, p.detach(), 0))
                n += 1
    return n
