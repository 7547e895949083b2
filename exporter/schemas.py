"""ONNX op schemas for the non-standard nodes we emit, registered with `onnx.defs` so onnxscript
can build them (it needs a schema to know inputs, outputs and attributes).

com.microsoft schemas restate the parts of ONNX Runtime's contrib schemas we use; the plugin
schemas are generated from runtime/contract.py.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from runtime import contract

_T = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_AttrType = OpSchema.AttrType
_Opt = OpSchema.FormalParameterOption.Optional


def _io(name: str, type_str: str = "T", optional: bool = False) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, param_option=_Opt if optional else OpSchema.FormalParameterOption.Single)


def _gqa() -> OpSchema:
    optional = ["position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
                "k_norm_weight", "query_seqlens"]
    inputs = [_io(n) for n in ("query", "key", "value")] + [_io("past_key", optional=True), _io("past_value", optional=True)]
    inputs += [_io("seqlens_k", "M"), _io("total_sequence_length", "M"), _io("cos_cache", optional=True),
               _io("sin_cache", optional=True)]
    types = {"position_ids": "tensor(int64)", "query_seqlens": "M"}
    inputs += [_io(n, types.get(n, "T"), optional=True) for n in optional]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=inputs,
        outputs=[_io("output"), _io("present_key"), _io("present_value")],
        type_constraints=[("T", _T, ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in (
            ("num_heads", _AttrType.INT), ("kv_num_heads", _AttrType.INT), ("scale", _AttrType.FLOAT),
            ("do_rotary", _AttrType.INT), ("rotary_interleaved", _AttrType.INT))],
    )


def _moe() -> OpSchema:
    return OpSchema(
        "MoE", "com.microsoft", 1,
        inputs=[_io("input"), _io("router_probs"), _io("fc1_experts_weights"), _io("fc1_experts_bias", optional=True),
                _io("fc2_experts_weights"), _io("fc2_experts_bias", optional=True),
                _io("fc3_experts_weights", optional=True), _io("fc3_experts_bias", optional=True)],
        outputs=[_io("output")],
        type_constraints=[("T", _T, "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in (
            ("k", _AttrType.INT), ("normalize_routing_weights", _AttrType.INT), ("activation_type", _AttrType.STRING),
            ("swiglu_fusion", _AttrType.INT), ("activation_alpha", _AttrType.FLOAT),
            ("activation_beta", _AttrType.FLOAT))],
    )


def _plugin(spec: contract.PluginSpec) -> OpSchema:
    types = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)"}
    constraints, inputs = [], []
    for t in spec.inputs:
        name = "T" if t.dtypes == spec.inputs[0].dtypes else "T_" + t.name
        if name != "T":
            constraints.append((name, [types[d] for d in t.dtypes], ""))
        inputs.append(_io(t.name, name))
    kinds = {"int32": _AttrType.INT, "float32": _AttrType.FLOAT}
    attrs = [OpSchema.Attribute(f.name, kinds[f.type], f.doc) for f in spec.fields]
    attrs += [OpSchema.Attribute("plugin_version", _AttrType.STRING, ""),
              OpSchema.Attribute("plugin_namespace", _AttrType.STRING, "")]
    return OpSchema(
        spec.name, contract.PLUGIN_DOMAIN, 1,
        inputs=inputs, outputs=[_io(t.name) for t in spec.outputs],
        type_constraints=[("T", [types[d] for d in spec.inputs[0].dtypes], ""), *constraints], attributes=attrs,
    )


def register() -> None:
    for schema in (_gqa(), _moe(), *(_plugin(s) for s in contract.PLUGINS)):
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


register()
