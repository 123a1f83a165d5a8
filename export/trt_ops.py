"""TensorRT's published ONNX operator support, as data: which ops its ONNX parser takes, for which
tensor types, and with which restrictions, so `lftk export --check-trt` can vet graphs on a
machine without TensorRT.

Source: onnx/onnx-tensorrt, docs/operators.md at the "ONNX-TensorRT 10.1 GA release" commit
(96e7811, June 2024), whose header reads "TensorRT 10.0 supports operators in the inclusive range
of opset 9 to opset 20". Transcribed by hand: one row per operator, types as the table's
"Supported Types" column, restrictions as checks on the node. Its notes also apply: DOUBLE is
cast down to FLOAT (so it passes where FP32 does), UINT8 is for network inputs/outputs only
(Cast), INT8/FP8/INT4 are quantized types reached through Q/DQ only. Update the table and this
citation together when moving to a newer TensorRT.

A restriction check gets the node and a `GraphFacts` view (constants, inferred types and shapes)
and returns the reason the node breaks the restriction, or None.
"""

from __future__ import annotations

from typing import Callable, Protocol

OPSET_RANGE = (9, 20)  # inclusive, per the table's header
SOURCE = "onnx-tensorrt docs/operators.md @ 10.1 GA (96e7811)"

F = frozenset({"FP32", "FP16", "BF16"})
FI = F | {"INT32", "INT64"}
FIB = FI | {"BOOL"}
B = frozenset({"BOOL"})
F32_16 = frozenset({"FP32", "FP16"})


class GraphFacts(Protocol):
    def is_constant(self, name: str) -> bool: ...
    def constant(self, name: str): ...  # numpy array of an initializer / Constant output, or None
    def shape(self, name: str) -> list | None: ...  # dims (int, or str for symbolic), None if unknown


Check = Callable[[object, GraphFacts], "str | None"]


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _constant_input(i: int, what: str, how: str = "an initializer") -> Check:
    def check(node, g):
        name = _input(node, i)
        if name and not g.is_constant(name):
            return f"`{what}` must be {how}"
        return None

    return check


def _zero_point(i: int, what: str) -> Check:
    def check(node, g):
        name = _input(node, i)
        if not name:
            return None
        value = g.constant(name)
        if value is None:
            return f"`{what}` must be a constant zero"
        if (value != 0).any():
            return f"`{what}` must be zero (found {value.ravel()[:4].tolist()}): TensorRT quantization is symmetric"
        return None

    return check


def _pool(spatial: bool = True, indices: bool = False) -> Check:
    def check(node, g):
        dil = _attr(node, "dilations")
        if dil and any(d != 1 for d in dil):
            return "`dilations` must be empty or all ones"
        ks = _attr(node, "kernel_shape")
        if spatial and ks is not None and len(ks) not in (2, 3):
            return "2D or 3D pooling only"
        if indices and len(node.output) > 1 and node.output[1]:
            return "`Indices` output tensor unsupported"
        return None

    return check


def _constant_attr(node, g):
    for bad in ("sparse_value", "value_string", "value_strings"):
        if _attr(node, bad) is not None:
            return f"`{bad}` attribute unsupported"
    return None


def _dropout(node, g):
    name = _input(node, 2)
    if not name:
        return None
    value = g.constant(name)
    if value is None or bool(value.any()):
        return "`is_training` must be an initializer evaluating to False"
    return None


def _static_input(node, g):
    shape = g.shape(_input(node, 0))
    if shape is not None and not all(isinstance(d, int) for d in shape):
        return "`input` must have static dimensions"
    return None


def _only_first_output(node, g):
    if any(node.output[1:]):
        return "only the first output `Y` is supported"
    return None


def _same_activations(node, g):
    acts = _attr(node, "activations")
    if _attr(node, "direction") == "bidirectional" and acts and acts[: len(acts) // 2] != acts[len(acts) // 2 :]:
        return "bidirectional: activation functions must be the same for both passes"
    return None


def _lstm(node, g):
    if _attr(node, "input_forget", 0) != 0:
        return "`input_forget` attribute must be 0"
    if _attr(node, "layout", 0) != 0:
        return "`layout` attribute must be 0"
    return _same_activations(node, g)


RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_MODE = {"nearest", "linear"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _resize(node, g):
    coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if coord not in RESIZE_COORD:
        return f"coordinate_transformation_mode {coord!r} unsupported (supported: {', '.join(sorted(RESIZE_COORD))})"
    mode = _attr(node, "mode", "nearest")
    if mode not in RESIZE_MODE:
        return f"mode {mode!r} unsupported (supported: nearest, linear)"
    nearest = _attr(node, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest not in RESIZE_NEAREST:
        return f"nearest_mode {nearest!r} unsupported"
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy must be 'stretch'"
    if _attr(node, "antialias", 0):
        return "antialiasing is not supported"
    axes = _attr(node, "axes")
    shape = g.shape(_input(node, 0))
    if axes is not None and _input(node, 2) and shape is not None and list(axes) != list(range(len(shape))):
        return "with a `scales` input, `axes` must be 0..rank-1"
    return None


def _scatter_nd(node, g):
    return "`reduction` is not supported" if _attr(node, "reduction", "none") != "none" else None


def _topk(node, g):
    if _attr(node, "sorted", 1) != 1:
        return "`sorted` must be 1"
    k = g.constant(_input(node, 1))
    if k is not None and int(k.ravel()[0]) >= 3840:
        return f"`K` must be less than 3840 (got {int(k.ravel()[0])})"
    return None


def _rank(rank: int, what: str) -> Check:
    def check(node, g):
        shape = g.shape(_input(node, 0))
        return f"{what}" if shape is not None and len(shape) != rank else None

    return check


def _deform_conv(node, g):
    shape = g.shape(_input(node, 0))
    if shape is not None and len(shape) - 2 not in (1, 2):
        return "`input` must have 1D or 2D spatial dimensions"
    pads = _attr(node, "pads")
    if pads and list(pads[: len(pads) // 2]) != list(pads[len(pads) // 2 :]):
        return "`pads` must be the same at the beginning and end of each spatial axis"
    return None


def _if_branches(node, g):
    then, other = _attr(node, "then_branch"), _attr(node, "else_branch")
    if then is not None and other is not None:
        if {o.name for o in then.output} & {o.name for o in other.output}:
            return "outputs of the two branches must have different names"
    return None


_AXES_1 = _constant_input(1, "axes")
# op -> (supported types of its type-carrying tensor, restriction check or None)
SUPPORTED: dict[str, tuple[frozenset, Check | None]] = {
    "Abs": (FI, None), "Acos": (F, None), "Acosh": (F, None), "Add": (FI, None), "And": (B, None),
    "ArgMax": (FI, None), "ArgMin": (FI, None), "Asin": (F, None), "Asinh": (F, None), "Atan": (F, None),
    "Atanh": (F, None), "AveragePool": (F, _pool()), "BatchNormalization": (F, None),
    "Cast": (FIB | {"UINT8"}, None), "CastLike": (FIB | {"UINT8"}, None), "Ceil": (F, None), "Celu": (F, None),
    "Clip": (F, None), "Concat": (FIB, None), "Constant": (FIB, _constant_attr),
    "ConstantOfShape": (FIB, None),  # the table spells INT64 "INF64" here
    "Conv": (F, None), "ConvTranspose": (F, None), "Cos": (F, None), "Cosh": (F, None),
    "CumSum": (F, _constant_input(1, "axis")), "DeformConv": (F32_16, _deform_conv), "DepthToSpace": (FI, None),
    "DequantizeLinear": (frozenset({"INT8", "FP8", "INT4"}), _zero_point(2, "x_zero_point")),
    "Div": (FI, None), "Dropout": (F, _dropout), "Einsum": (F, None), "Elu": (F, None), "Equal": (FI, None),
    "Erf": (F, None), "Exp": (F, None), "Expand": (FIB, None), "EyeLike": (FIB, _static_input),
    "Flatten": (FIB, None), "Floor": (F, None), "Gather": (FIB, None), "GatherElements": (FIB, None),
    "GatherND": (FIB, None), "Gelu": (F | {"INT8", "INT32", "INT64"}, None), "Gemm": (F, None),
    "GlobalAveragePool": (F, None), "GlobalLpPool": (F, None), "GlobalMaxPool": (F, None), "Greater": (FI, None),
    "GreaterOrEqual": (FI, None), "GridSample": (F32_16, _rank(4, "input must be 4D")),
    "GroupNormalization": (F, None), "GRU": (F, _same_activations), "HardSigmoid": (F, None),
    "HardSwish": (F, None), "Hardmax": (F, None), "Identity": (FIB, None), "If": (FIB, _if_branches),
    "ImageScaler": (F, None), "InstanceNormalization": (F, None), "IsInf": (F, None), "IsNaN": (FI, None),
    "LayerNormalization": (F, _only_first_output), "LeakyRelu": (F, None), "Less": (FI, None),
    "LessOrEqual": (FI, None), "Log": (F, None), "LogSoftmax": (F, None), "Loop": (FIB, None), "LRN": (F, None),
    "LSTM": (F, _lstm), "LpNormalization": (F, None), "LpPool": (F, _pool(spatial=False)), "MatMul": (F, None),
    "Max": (FI, None), "MaxPool": (F, _pool(indices=True)), "Mean": (FI | {"FP8"}, None),
    "MeanVarianceNormalization": (F, None), "Min": (FI, None), "Mish": (F32_16, None), "Mod": (FI, None),
    "Mul": (FI, None), "Neg": (FI, None), "NonMaxSuppression": (F32_16, None), "NonZero": (F32_16, None),
    "Not": (B, None), "OneHot": (FIB, _constant_input(1, "depth", "a build-time constant")), "Or": (B, None),
    "Pad": (FI, _constant_input(3, "axes")), "ParametricSoftplus": (F, None), "Pow": (F, None), "PRelu": (F, None),
    "QuantizeLinear": (F, _zero_point(2, "y_zero_point")), "RandomNormal": (F, None),
    "RandomNormalLike": (F, None), "RandomUniform": (F, None), "RandomUniformLike": (F, None),
    "Range": (FI, None), "Reciprocal": (F, None),
    **{f"Reduce{r}": (FI, _AXES_1) for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
    "Relu": (FI, None), "Reshape": (FIB, None), "Resize": (F, _resize), "ReverseSequence": (FIB, None),
    "RNN": (F, _same_activations), "RoiAlign": (F32_16, None), "Round": (F, None), "ScaledTanh": (F, None),
    "Scan": (F, None), "Scatter": (FI, None), "ScatterElements": (FI, None), "ScatterND": (FI, _scatter_nd),
    "Selu": (F, None), "Shape": (FIB, None), "Shrink": (FI, None), "Sigmoid": (F, None), "Sign": (FI, None),
    "Sin": (F, None), "Sinh": (F, None), "Size": (FIB, None), "Slice": (FIB, _constant_input(3, "axes")),
    "Softmax": (F, None), "Softplus": (F, None), "Softsign": (F, None), "SpaceToDepth": (FI, None),
    "Split": (FIB, None), "Sqrt": (F, None), "Squeeze": (FIB, _AXES_1), "Sub": (FI, None), "Sum": (FI, None),
    "Tan": (F, None), "Tanh": (F, None), "ThresholdedRelu": (F, None), "Tile": (FIB, None), "TopK": (FI, _topk),
    "Transpose": (FIB, None), "Trilu": (FIB, None),
    "Unsqueeze": (FIB, _constant_input(1, "axes", "a constant tensor")), "Upsample": (F, None), "Where": (FIB, None),
    "Xor": (B, None),
}

# Listed with "N": named so that a refusal can say "listed as unsupported" rather than "not listed".
UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "BlackmanWindow", "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool",
    "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "STFT", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit",
    "TfIdfVectorizer", "Unique",
})

# Which input carries the type the table's "Supported Types" column is about (default: input 0).
TYPE_INPUT = {"Where": 1}
# Ops whose type comes from an attribute (no data input): attribute name, default ONNX elem type.
TYPE_ATTR = {"Constant": ("value", None), "ConstantOfShape": ("value", 1), "RandomNormal": ("dtype", 1),
             "RandomUniform": ("dtype", 1)}

# ONNX TensorProto element types by the table's names. DOUBLE is cast down to FLOAT by TensorRT.
ONNX_TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
              11: "DOUBLE", 17: "FP8", 22: "INT4"}


def type_supported(type_name: str, allowed: frozenset) -> bool:
    if type_name == "DOUBLE":
        return "FP32" in allowed
    return type_name in allowed
