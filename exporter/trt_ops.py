"""Standard ONNX ops the tensorrt-target graph may contain.

Source: onnx-tensorrt `docs/operators.md` for TensorRT 10.0 (opset 9-20), every entry 'Y'
for FP32/FP16/BF16 or INT32/INT64 as used here. Checked by tests/exporter/test_tensorrt_target.py
against every exported graph; add an op here only after checking that table.
"""

TRT_VERSION = "10.0"
ALLOWED_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "Div", "Expand", "Gather", "GatherElements", "Gemm", "LessOrEqual",
    "MatMul", "Mul", "Pow", "Range", "Reciprocal", "ReduceMean", "Reshape", "ScatterND", "Shape", "Sigmoid",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
})
