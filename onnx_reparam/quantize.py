"""INT8 measured: how a model's weights sit for an 8-bit grid, and what INT8 does to its outputs.

Nothing here changes a model the user gets: weight-only INT8 is simulated by rounding the weights
of each Conv / ConvTranspose / Gemm / MatMul to 255 levels (symmetric, per tensor or per output
channel) and running the model in float; full INT8 is onnxruntime's own ``quantize_static`` (QDQ,
MinMax calibration) run as a deployment runs it (ORT's optimizations on, so its int8 kernels are
used). Outputs are compared with the float model's: SQNR in dB over all values of an output, and,
for a 2-D output (logits), how often the top-1 class agrees.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .algebra import input_channels
from .errors import ReparamError, first_line
from .runtime import Runner

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LEVELS = 127  # symmetric int8: -127..127, as onnxruntime's and TensorRT's weight quantizers use

Feeds = dict[str, np.ndarray]


@dataclass
class LayerWeights:
    """One layer's weight, as an INT8 grid sees it."""
    node: str
    op: str
    shape: tuple[int, ...]
    largest: float  # the tensor's largest |w|: sets a per-tensor grid's step
    median_channel: float  # the median output channel's largest |w|
    outlier_ratio: float  # largest / median channel range: how much of the grid the median channel gets
    outlier_channel: int
    outlier_tap: str  # where the tensor's largest |w| sits: "centre tap of its own channel (identity)", ...
    median_weight: float  # the median |w|: an outlier inside each channel shows here, not in the ratio
    channel_ranges: list[float] = field(default_factory=list, repr=False)  # largest |w| per output channel

    @property
    def median_levels(self) -> float:
        """How many of the 127 levels the median channel's weights span on a per-tensor grid."""
        return LEVELS * self.median_channel / self.largest if self.largest else 0.0

    @property
    def weight_levels(self) -> float:
        """How many levels of a per-tensor grid the median |w| is worth (the tensor's resolution)."""
        return LEVELS * self.median_weight / self.largest if self.largest else 0.0


def weight_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto, int]]:
    """The layers with a constant weight (an initializer), each with the weight and the axis of
    its output channels."""
    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in LAYERS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = weights.get(node.input[1])
        if weight is None or weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            axis = 0 if attribute(node, "transB", 0) else 1
        elif node.op_type == "MatMul":
            if len(weight.dims) != 2:
                continue
            axis = 1
        else:
            axis = 0
        found.append((node, weight, axis))
    return found


def attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def channel_ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    """Largest |w| of each output channel."""
    return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)


def describe_weights(model: onnx.ModelProto) -> list[LayerWeights]:
    layers = []
    for node, tensor, axis in weight_layers(model):
        weight = numpy_helper.to_array(tensor).astype(np.float64)
        if weight.size == 0:
            continue
        ranges = channel_ranges(weight, axis)
        median = float(np.median(ranges))
        position = np.unravel_index(int(np.argmax(np.abs(weight))), weight.shape)
        channel = int(position[axis])
        layers.append(LayerWeights(node.name, node.op_type, tuple(weight.shape), float(ranges.max()), median,
                                   float(ranges.max() / median) if median > 0 else float("inf"), channel,
                                   _tap(node, weight.shape, position), float(np.median(np.abs(weight))),
                                   [float(r) for r in ranges]))
    return layers


def _tap(node: onnx.NodeProto, shape: tuple[int, ...], position: tuple) -> str:
    """Where a conv weight's largest value sits: the centre tap of the channel's own input (what an
    identity or BN branch merged into the conv adds), another centre tap, another tap, or a 1x1."""
    if node.op_type != "Conv" or len(shape) < 3:
        return f"row {position[0]}, column {position[1]}" if len(shape) == 2 else ""
    kernel = shape[2:]
    if all(k == 1 for k in kernel):
        return "1x1 kernel"
    out_channel, in_index = int(position[0]), int(position[1])
    taps = tuple(int(p) for p in position[2:])
    reads = input_channels(shape[0], shape[1], max(1, int(attribute(node, "group", 1))))
    if all(2 * t + 1 == k for t, k in zip(taps, kernel)):
        if reads[out_channel, in_index] == out_channel:
            return "centre tap of its own input channel (where an identity or BN branch lands)"
        return "centre tap"
    return "tap (" + ", ".join(map(str, taps)) + ")"


def quantize_weights(model: onnx.ModelProto, per_channel: bool = False, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy whose layer weights are rounded to a symmetric 255-level grid (per tensor, or per
    output channel), except those of the nodes in ``keep``: weight-only INT8, run in float."""
    keep = set(keep)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    done: set[str] = set()
    for node, tensor, axis in weight_layers(result):
        if node.name in keep or tensor.name in done:
            continue
        done.add(tensor.name)
        weight = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(fake_quantize(weight, axis if per_channel else None), tensor.name))
    return result


def fake_quantize(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Round to a symmetric int8 grid and back (per tensor, or per slice along ``axis``)."""
    values = weight.astype(np.float64)
    if axis is None:
        largest = np.abs(values).max()
    else:
        shape = [1] * values.ndim
        shape[axis] = values.shape[axis]
        largest = channel_ranges(values, axis).reshape(shape)
    step = np.where(largest > 0, largest / LEVELS, 1.0)
    return (np.clip(np.round(values / step), -LEVELS, LEVELS) * step).astype(weight.dtype)


def quantize_qdq(model: onnx.ModelProto, calibration: Sequence[Feeds], per_channel: bool = False,
                 exclude: Iterable[str] = ()) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` (QDQ, MinMax calibration on ``calibration``, int8 weights
    and activations, its defaults otherwise), leaving the nodes in ``exclude`` in float."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="onnx-reparam-int8-") as tmp, _quiet_root_logger():
        source, out = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, source)  # given a ModelProto, quantize_static writes its weights where it cannot read them
        try:
            quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            nodes_to_exclude=sorted(set(exclude)), calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer failing is the answer, said in one line
            raise ReparamError(f"onnxruntime's quantize_static failed: {first_line(exc)}") from None
        return onnx.load(out)


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static advises pre-processing on the root logger; that pre-processing would fold
    the BN of a training-structure model before it is quantized, so it is not what we measure."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(model: onnx.ModelProto, feed_sets: Sequence[Feeds], optimized: bool = True) -> list[list[np.ndarray]]:
    """Every output of ``model`` on each feed set, on the CPU, with ORT's optimizations as deployed."""
    return Runner("cpu").run(model, list(feed_sets), optimized)


def sqnr_db(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Signal to quantization noise over every value of one output on every feed set, in dB; NaN
    where the shapes differ (detections after NMS: another count of boxes), which has no SQNR."""
    if any(np.shape(r) != np.shape(t) for r, t in zip(reference, test)):
        return float("nan")
    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    noise = ref - np.concatenate([np.asarray(t, np.float64).ravel() for t in test])
    signal, error = float(np.sum(ref ** 2)), float(np.sum(noise ** 2))
    if error == 0:
        return float("inf")
    return 10 * np.log10(signal / error) if signal > 0 else float("-inf")


def top1_agreement(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float | None:
    """How often the largest value of each row is at the same place: for [N, classes] outputs."""
    if any(np.ndim(r) != 2 or np.shape(r) != np.shape(t) for r, t in zip(reference, test)):
        return None
    ref = np.concatenate([np.argmax(r, axis=1) for r in reference])
    got = np.concatenate([np.argmax(t, axis=1) for t in test])
    return float(np.mean(ref == got))


@dataclass
class Outcome:
    """What INT8 did to each float output: SQNR in dB, and top-1 agreement where the output is
    [N, classes]; or why there is no figure (the quantizer failed, or onnxruntime cannot run the
    model it made)."""
    sqnr: list[float]
    agreement: list[float | None]
    error: str = ""

    @property
    def worst(self) -> float:
        """The lowest SQNR of the outputs that could be compared (-inf if none could)."""
        finite = [value for value in self.sqnr if not np.isnan(value)]
        return min(finite) if finite else float("-inf")


def compare(reference: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> Outcome:
    """The float outputs compared (integer ones, such as detection indices, have no SQNR)."""
    floats = [i for i, value in enumerate(reference[0]) if np.issubdtype(np.asarray(value).dtype, np.floating)]
    if not floats:
        raise ReparamError("the model has no float output to measure INT8 on")
    per_output = [[r[i] for r in reference] for i in floats], [[t[i] for t in test] for i in floats]
    return Outcome([sqnr_db(r, t) for r, t in zip(*per_output)],
                   [top1_agreement(r, t) for r, t in zip(*per_output)])


def measured(reference: list[list[np.ndarray]], quantize: Callable[[], onnx.ModelProto],
             evaluation: Sequence[Feeds]) -> Outcome:
    """The outcome of the model ``quantize`` makes, run on ``evaluation``; a quantizer that fails,
    or a quantized model onnxruntime cannot run, is an outcome too (with its error)."""
    try:
        outputs = run(quantize(), evaluation)
    except ReparamError as exc:
        return Outcome([], [], str(exc))
    except Exception as exc:  # noqa: BLE001 - onnxruntime failing on the model its quantizer made is a finding
        return Outcome([], [], f"onnxruntime cannot run the quantized model: {first_line(exc)}")
    return compare(reference, outputs)


def activation_ranges(model: onnx.ModelProto, calibration: Sequence[Feeds]) -> dict[str, tuple[float, float]]:
    """The smallest and largest value of every float tensor a layer reads or writes, over the
    calibration feeds (MinMax calibration, as onnxruntime's calibrator computes it)."""
    wanted = []
    weights = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in LAYERS:
            wanted += [name for name in (node.input[0], node.output[0]) if name and name not in weights]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(wanted) if name not in outputs)
    names = [o.name for o in probe.graph.output]
    wanted_names = set(wanted)
    ranges: dict[str, tuple[float, float]] = {}
    for values in run(probe, calibration, optimized=False):
        for name, value in zip(names, values):
            if name not in wanted_names or not np.issubdtype(np.asarray(value).dtype, np.floating):
                continue
            low, high = float(np.min(value)), float(np.max(value))
            old = ranges.get(name, (low, high))
            ranges[name] = (min(low, old[0]), max(high, old[1]))
    return ranges
