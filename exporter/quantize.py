"""Weight-only int4/int8 quantization for the onnxruntime target (ONNX Runtime's own quantized ops).

    [traced graph] -> rewrite(): Gemm(x, W^T)          -> com.microsoft::MatMulNBits
                                 MoE(x, r, W1, W2)     -> com.microsoft::QMoE
                                 Gather(embeddings, i) -> com.microsoft::GatherBlockQuantized
    -> the writer streams each weight piece through quantize_rows() (export.write_weights)

Scheme: symmetric, block-wise along the input dimension (each row of a checkpoint's [out, in]
matrix is cut into blocks of `block_size`); the block's value of largest magnitude maps to -2^(b-1)
exactly: scale = that value / -2^(b-1), q = clamp(round(w / scale) + 2^(b-1), 0, 2^b - 1),
w' = (q - 2^(b-1)) * scale. 4-bit values pack two per byte, the first in the low nibble. Scales
are stored in the compute dtype (what ONNX Runtime's kernels take). These are the layouts the three
ops read with no zero-point input (checked against ONNX Runtime 1.32's CPU kernels in the tests).

Activations: "float" (int4 only) dequantizes the weights inside the kernels, so the artifact
computes exactly what the float model computes with the quantized weights; "int8" (ONNX Runtime's
accuracy_level 4) also quantizes the activations per block on the fly, which is what its fast CPU
kernels for 8-bit weights need: measured on ONNX Runtime 1.32's CPU provider, 8-bit MatMulNBits
with float activations took 30x the time of the float32 Gemm it replaces, and its QMoE runs
8-bit block weights through the int8 path whatever accuracy_level says.

Left unquantized: the router (`mlp.gate`) and the shared-expert gate (tiny, and they decide the
routing), norms, biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_ir as ir
import torch

from runtime.errors import QmoeError
from runtime.manifest import QUANT_ACTIVATIONS as ACTIVATIONS
from runtime.manifest import QUANT_BLOCK_SIZES as BLOCK_SIZES
from runtime.manifest import QUANT_SCHEMES as SCHEMES

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .gptq import Sources

MS_DOMAIN = "com.microsoft"
DEFAULT_BLOCK = 32
SUFFIX_Q, SUFFIX_S, SUFFIX_Z = ".q", ".scales", ".zero_points"


class QuantizeError(QmoeError, ValueError):
    pass


DEFAULT_ACTIVATIONS = {4: "float", 8: "int8"}


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    block_size: int
    activations: str = "float"  # "float" | "int8" (see module docstring)
    method: str = "rtn"  # "rtn": quantized here (round to nearest); "gptq": carried over from a GPTQ checkpoint
    symmetric: bool = True  # False: per-block zero points (asymmetric GPTQ)
    # GPTQ/AWQ: how the layers the checkpoint keeps float (head, embeddings, any float linear but
    # the router and shared-expert gate) are quantized here, round to nearest; None: left float
    rest: "QuantConfig | None" = None

    @classmethod
    def parse(cls, scheme: str, block_size: int | None = None, activations: str | None = None) -> "QuantConfig":
        if scheme not in SCHEMES:
            raise QuantizeError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
        bits = SCHEMES[scheme]
        block = DEFAULT_BLOCK if block_size is None else block_size
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block not in BLOCK_SIZES:
            raise QuantizeError(f"quantization block size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                                f"got {block}")
        act = DEFAULT_ACTIVATIONS[bits] if activations is None else activations
        if act not in ACTIVATIONS:
            raise QuantizeError(f"unknown activation precision {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if bits == 8 and act == "float":
            raise QuantizeError("int8 weights run with int8 activations (ONNX Runtime's CPU kernels for 8-bit "
                                "weights with float activations are ~30x slower than float32); use --quantize int4 "
                                "for float activations")
        return cls(bits, int(block), act)

    @property
    def accuracy_level(self) -> int:
        """ONNX Runtime's attribute: 0 = float math on dequantized weights, 4 = int8 activations."""
        return 0 if self.activations == "float" else 4

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        """From a manifest's `quantization` entry (validated by runtime.manifest)."""
        qc = cls.parse(d["scheme"], d["block_size"], d["activations"])
        rest = cls.from_json(d["rest"]) if d.get("rest") is not None else None
        return replace(qc, method=d.get("method", "rtn"), symmetric=d.get("symmetric", True), rest=rest)

    def to_json(self) -> dict:
        d = {"scheme": f"int{self.bits}", "bits": self.bits, "block_size": self.block_size,
             "activations": self.activations, "symmetric": self.symmetric, "method": self.method}
        if self.rest is not None:
            d["rest"] = self.rest.to_json()
        return d


@dataclass(frozen=True)
class QTensor:
    """A quantized initializer pair in the rewritten graph, filled from checkpoint parameter `source`."""
    source: str  # the export model's parameter name (weights.pieces() knows how to read it)
    qname: str
    sname: str
    k: int  # input features per row
    block: int
    bits: int
    scale_dtype: torch.dtype
    zname: str | None = None  # packed zero points (asymmetric GPTQ), None: 2^(bits-1)
    gptq: "Sources | None" = None  # None: quantized here from the float weights


def row_bytes(k: int, bits: int, block: int) -> tuple[int, int]:
    """(packed bytes per row, scales per row) for rows of k inputs."""
    nb = -(-k // block)
    return nb * block * bits // 8, nb


def quantize_rows(w: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, K] -> (packed uint8 [R, nb * block * bits / 8], float32 scales [R, nb]). A last
    partial block is padded with zeros (MatMulNBits' layout)."""
    w = w.float()
    R, K = w.shape
    nb = -(-K // block)
    if nb * block != K:
        w = torch.nn.functional.pad(w, (0, nb * block - K))
    b = w.reshape(R, nb, block)
    zp = 1 << (bits - 1)
    extreme = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    s = extreme / -zp
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = (torch.round(b / s) + zp).clamp_(0, 2 * zp - 1).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.reshape(R, -1), s.reshape(R, nb)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, bits: int, block: int, k: int) -> torch.Tensor:
    """Inverse of quantize_rows: packed [R, bytes], scales [R, nb] (any float dtype) -> float32 [R, k]."""
    R = q.shape[0]
    if bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(R, -1)
    nb = scales.shape[-1]
    vals = (q.float() - (1 << (bits - 1))).reshape(R, nb, -1) * scales.float().reshape(R, nb, 1)
    return vals.reshape(R, -1)[:, :k]


def fake_quantize(w: torch.Tensor, bits: int, block: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """w as the quantized artifact holds it (rows along the last axis, scales rounded to scale_dtype)."""
    flat = w.reshape(-1, w.shape[-1])
    q, s = quantize_rows(flat, bits, block)
    return dequantize_rows(q, s.to(scale_dtype), bits, block, flat.shape[-1]).reshape(w.shape).to(w.dtype)


# -- which weights ---------------------------------------------------------------------------------

_UNQUANTIZED_SUFFIXES = (".mlp.gate.weight", ".shared_expert_gate.weight")


def linear_is_quantized(name: str) -> bool:
    """Linear weights (export or Hugging Face names) that become MatMulNBits; not the router or the
    shared-expert gate."""
    return not name.endswith(_UNQUANTIZED_SUFFIXES)


def embedding_is_quantized(hidden_size: int, qc: QuantConfig) -> bool:
    """GatherBlockQuantized takes whole blocks only; otherwise the embeddings stay float (and so
    does a head tied to them)."""
    return hidden_size % qc.block_size == 0


def hf_block(name: str, shape: tuple[int, ...], qc: QuantConfig) -> int | None:
    """Block size a Hugging Face parameter is quantized with (None: left as is), for a reference
    model holding the artifact's quantized weights. Mirrors _Rewriter (which decides by op, on the
    export's names); the parity tests fail if the two disagree. Rows are the last axis in every layout
    (transformers 4 per-expert Linears, transformers 5 fused [E, 2I, H] / [E, H, I])."""
    if math.prod(shape) == 0:
        return None  # empty (a shared expert of size 0): nothing to quantize
    if name == "model.embed_tokens.weight":
        return qc.block_size if embedding_is_quantized(shape[-1], qc) else None
    if name == "lm_head.weight":
        return qc.block_size
    if ".mlp.experts." in name and (name.endswith("_proj") or name.endswith("_proj.weight")):
        return qc.block_size
    if name.endswith("proj.weight") and ("self_attn." in name or ".mlp." in name):
        return qc.block_size if linear_is_quantized(name) else None
    return None


def fake_quantize_hf(model: torch.nn.Module, qc: QuantConfig, scale_dtype: torch.dtype,
                     skip: Callable[[str], bool] = lambda _name: False) -> int:
    """Replaces a transformers Qwen2-MoE model's weights by their quantized values; returns how many.
    A tied head follows the embeddings (the first name of a shared tensor decides). `skip`: names
    left as they are (a GPTQ checkpoint's own quantized layers)."""
    n = 0
    decided: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in decided:
                continue
            decided.add(id(p))
            if skip(name):
                continue
            block = hf_block(name, tuple(p.shape), qc)
            if block is not None:
                p.copy_(fake_quantize(p, qc.bits, block, scale_dtype))
                n += 1
    return n


# -- graph rewrite ---------------------------------------------------------------------------------

def _param_source(value: ir.Value | None) -> ir.Value | None:
    """The parameter initializer behind `value`, directly or through one Cast (bf16 weights)."""
    if value is None:
        return None
    if value.is_initializer():
        return value
    node = value.producer()
    if node is not None and node.op_type == "Cast" and node.domain == "" and node.inputs[0] is not None \
            and node.inputs[0].is_initializer():
        return node.inputs[0]
    return None


def _shape(value: ir.Value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.const_value.shape)


def zero_point_bytes(blocks: int, bits: int) -> int:
    """Packed zero points per row (MatMulNBits / QMoE: a row's blocks packed along them)."""
    return -(-blocks * bits // 8)


class _Rewriter:
    def __init__(self, model_ir: ir.Model, qc: QuantConfig, scale_dtype: torch.dtype,
                 gptq: "Callable[[str], Sources | None] | None" = None) -> None:
        self.graph, self.qc, self.scale_dtype = model_ir.graph, qc, scale_dtype
        self.gptq = gptq  # a GPTQ checkpoint: export parameter -> its packed linears (None: float)
        # how layers without packed linears are quantized here (None: a GPTQ checkpoint's stay float)
        self.float_qc = qc if gptq is None else qc.rest
        self.scale_ir = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16}[scale_dtype]
        self.tensors: dict[str, QTensor] = {}
        self.replaced: list[ir.Node] = []

    def _pair(self, qc: QuantConfig, source: ir.Value, role: str, qshape: tuple[int, ...], sshape: tuple[int, ...],
              k: int, block: int, zshape: tuple[int, ...] | None = None,
              gptq: "Sources | None" = None) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """The packed weights and scales (and with `zshape` zero points) standing for `source`."""
        qname = f"{source.name}{role}{SUFFIX_Q}{qc.bits}"
        sname = f"{source.name}{role}{SUFFIX_S}"
        zname = None if zshape is None else f"{source.name}{role}{SUFFIX_Z}"
        if qname not in self.tensors:
            self.tensors[qname] = QTensor(source.name, qname, sname, k, block, qc.bits, self.scale_dtype, zname, gptq)
            parts = [(qname, qshape, ir.DataType.UINT8), (sname, sshape, self.scale_ir)]
            if zname is not None and zshape is not None:
                parts.append((zname, zshape, ir.DataType.UINT8))
            for name, shape, dtype in parts:
                nbytes = int(dtype.itemsize * math.prod(shape))
                v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                             const_value=ir.ExternalTensor("pending", 0, nbytes, dtype, shape=ir.Shape(shape),
                                                           name=name))
                self.graph.register_initializer(v)
        inits = self.graph.initializers
        return inits[qname], inits[sname], None if zname is None else inits[zname]

    def _node(self, old: ir.Node, domain: str, op_type: str, inputs: list, attrs: dict | None = None,
              within: str = "", num_outputs: int = 1) -> ir.Node:
        """The node replacing `old` (named like it), or with `within` a helper named under that."""
        name = f"{_renamed(old, within)}/{op_type}" if within else _renamed(old, op_type)
        return ir.Node(domain, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs or {}),
                       num_outputs=num_outputs, name=name, version=1 if domain else None)

    def _swap(self, old: ir.Node, nodes: list[ir.Node], out_dtype=None) -> None:
        """Replaces `old` by `nodes` (in order); the last one's output takes over old's."""
        out, new_out = old.outputs[0], nodes[-1].outputs[0]
        new_out.shape = out.shape
        new_out.type = ir.TensorType(out_dtype) if out_dtype is not None else out.type
        for n in nodes:
            self.graph.insert_before(old, n)
        ir.convenience.replace_all_uses_with(out, new_out, replace_graph_outputs=True)
        name, out.name = out.name, None
        new_out.name = name  # value names stay as traced
        self.replaced.append(old)

    def _const(self, old: ir.Node, array, within: str, name: str) -> ir.Value:
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array, name=name))],
                       num_outputs=1, name=f"{_renamed(old, within)}/{name}")
        self.graph.insert_before(old, node)
        return node.outputs[0]

    def gemm(self, node: ir.Node) -> None:
        w = _param_source(node.inputs[1])
        if w is None:
            return
        src = None if self.gptq is None else self.gptq(w.name)
        qc = self.qc if src is not None else self.float_qc
        if qc is None:
            return  # a float layer of the GPTQ checkpoint
        if src is None and not linear_is_quantized(w.name):
            return
        if src is None and w.name == "model.embed_tokens.weight" and not embedding_is_quantized(_shape(w)[1], qc):
            return  # a head tied to embeddings that stay float
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            raise QuantizeError(f"internal error: {node.name} is not a plain x @ W^T Gemm")
        N, K = _shape(w)
        if N * K == 0:
            return  # an empty weight (a shared expert of size 0) stays an empty Gemm
        nbytes, nb = row_bytes(K, qc.bits, qc.block_size)
        zshape = None if qc.symmetric else (N * zero_point_bytes(nb, qc.bits),)
        q, s, z = self._pair(qc, w, "", (N, nb, nbytes // nb), (N * nb,), K, qc.block_size, zshape, src)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        self._swap(node, [self._node(node, MS_DOMAIN, "MatMulNBits", [node.inputs[0], q, s, z, None, bias],
                                     {"K": K, "N": N, "bits": qc.bits, "block_size": qc.block_size,
                                      "accuracy_level": qc.accuracy_level})])

    def moe(self, node: ir.Node) -> None:
        fc1, fc2 = _param_source(node.inputs[2]), _param_source(node.inputs[4])
        if fc1 is None or fc2 is None:
            raise QuantizeError(f"internal error: {node.name}'s expert weights are not parameters")
        srcs = [None, None] if self.gptq is None else [self.gptq(fc1.name), self.gptq(fc2.name)]
        if self.gptq is not None and srcs.count(None) == 1:
            raise QuantizeError(f"{fc1.name if srcs[0] is None else fc2.name} is float and its layer's other "
                                "expert weights are GPTQ; ONNX Runtime's QMoE takes both quantized")
        qc = self.qc if srcs[0] is not None else self.float_qc
        if qc is None:
            return  # float experts in a GPTQ checkpoint: the float MoE stays
        block = qc.block_size
        pairs = []
        for w, src in zip((fc1, fc2), srcs):
            E, N, K = _shape(w)
            if K % block:
                if src is not None:
                    raise QuantizeError(f"{w.name}: {K} input features are not a multiple of the GPTQ checkpoint's "
                                        f"group_size {block}; ONNX Runtime's QMoE takes whole groups only")
                raise QuantizeError(f"{w.name}: {K} input features are not a multiple of the quantization block "
                                    f"size {block}; choose a --quant-block-size that divides it")
            nbytes, nb = row_bytes(K, qc.bits, block)
            zshape = None if qc.symmetric else (E, N, zero_point_bytes(nb, qc.bits))
            pairs.append(self._pair(qc, w, "", (E, N, nbytes), (E, N, nb), K, block, zshape, src))
        attrs = {k: a.value for k, a in node.attributes.items()}
        attrs["expert_weight_bits"] = qc.bits
        attrs["block_size"] = block
        attrs["accuracy_level"] = qc.accuracy_level
        # ONNX Runtime 1.32's CPU QMoE renormalises the top-k weights even with
        # normalize_routing_weights=0 (measured; its MoE does not). So it always renormalises here,
        # and without renormalisation (Qwen2-57B: norm_topk_prob false) the output is scaled back by
        # the top-k softmax mass: sum_topk(p) * sum_i (p_i / sum_topk(p)) y_i = sum_i p_i y_i.
        normalize = attrs.get("normalize_routing_weights", 0)
        attrs["normalize_routing_weights"] = 1
        (q1, s1, z1), (q2, s2, z2) = pairs
        logits = node.inputs[1]
        inputs = [node.inputs[0], logits, q1, s1, None, q2, s2]
        if z1 is not None:
            inputs += [None, None, None, None, z1, z2]  # fc2 bias, fc3 weights/scales/bias, then zero points
        nodes = [self._node(node, MS_DOMAIN, "QMoE", inputs, attrs)]
        if not normalize:
            k = self._const(node, np.array([attrs["k"]], np.int64), "QMoE", "k")
            axes = self._const(node, np.array([-1], np.int64), "QMoE", "axes")
            probs = self._node(node, "", "Softmax", [logits], {"axis": -1}, within="QMoE")
            top = self._node(node, "", "TopK", [probs.outputs[0], k], {"axis": -1}, within="QMoE", num_outputs=2)
            mass = self._node(node, "", "ReduceSum", [top.outputs[0], axes], {"keepdims": 1}, within="QMoE")
            nodes += [probs, top, mass,
                      self._node(node, "", "Mul", [nodes[0].outputs[0], mass.outputs[0]], within="QMoE")]
        self._swap(node, nodes)

    def gather(self, node: ir.Node) -> None:
        w = _param_source(node.inputs[0])
        qc = self.float_qc  # GPTQ packs no embeddings
        if w is None or w.name != "model.embed_tokens.weight" or qc is None:
            return
        V, H = _shape(w)
        if not embedding_is_quantized(H, qc):
            return
        nbytes, nb = row_bytes(H, qc.bits, qc.block_size)
        q, s, _ = self._pair(qc, w, ".gather", (V, nbytes), (V, nb), H, qc.block_size)
        self._swap(node, [self._node(node, MS_DOMAIN, "GatherBlockQuantized", [q, node.inputs[1], s],
                                     {"bits": qc.bits, "block_size": qc.block_size, "gather_axis": 0,
                                      "quantize_axis": 1})], out_dtype=self.scale_ir)

    def run(self) -> dict[str, QTensor]:
        for node in list(self.graph):
            if node.domain == "" and node.op_type == "Gemm":
                self.gemm(node)
            elif node.domain == MS_DOMAIN and node.op_type == "MoE":
                self.moe(node)
            elif node.domain == "" and node.op_type == "Gather":
                self.gather(node)
        for node in self.replaced:
            self.graph.remove(node, safe=True)
        _drop_unused(self.graph)
        return self.tensors


def _renamed(node: ir.Node, op_type: str) -> str:
    """/model/layers/0/mlp/Gemm_2 -> /model/layers/0/mlp/MatMulNBits_2 (names stay unique)."""
    head, _, last = (node.name or "").rpartition("/")
    return f"{head}/{last.replace(node.op_type, op_type, 1)}"


def _drop_unused(graph: ir.Graph) -> None:
    """Removes Cast nodes and initializers nothing reads any more (the float weights replaced)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type == "Cast" and node.domain == "" and not node.outputs[0].uses() \
                    and not node.outputs[0].is_graph_output():
                graph.remove(node, safe=True)
                changed = True
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]


def rewrite(model_ir: ir.Model, qc: QuantConfig, compute_dtype: torch.dtype,
            gptq: "Checkpoint | None" = None, interleaved: bool = True) -> dict[str, QTensor]:
    """Replaces the float weights' ops by ONNX Runtime's quantized ops; returns the new initializers
    (by packed name), whose bytes export.write_weights() streams from the checkpoint: quantized
    there, or with `gptq` (a GPTQ checkpoint) repacked from its GPTQ layers (exporter/gptq.py)."""
    if compute_dtype not in (torch.float32, torch.float16):
        raise QuantizeError(f"quantized artifacts compute in float32 or float16, not {compute_dtype}")
    plan = None
    if gptq is not None:
        from .gptq import sources

        ckpt = gptq

        def plan(name: str) -> "Sources | None":
            return sources(ckpt, name, interleaved)
    return _Rewriter(model_ir, qc, compute_dtype, plan).run()
