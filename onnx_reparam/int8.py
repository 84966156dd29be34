"""quantize-check: how a model will take INT8, found from its weights alone and, given calibration
data, measured; and the hints quantizers take (what to keep in higher precision, activation ranges).

Without data: per layer, the weight range per output channel, the outlier ratio (largest / median
channel range), where the largest weight sits, and how many of an INT8 grid's 127 levels the median
channel gets. Given the training export, the identity-branch BN gains each fused layer holds.

With data (split in two disjoint halves: calibration, then evaluation): end-to-end SQNR and top-1
agreement against FP32 for weight-only INT8 and onnxruntime's QDQ, per tensor and per channel,
of the model and of it after ``--int8-ready``; the layers ranked by the SQNR of quantizing each
alone (weight-only, per tensor); QDQ measured with the 1, 2, 4... most sensitive layers in float
(up to a quarter of them), and the best of those as the keep list.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from xml.sax.saxutils import escape

import numpy as np
import onnx
from onnx import numpy_helper

from . import quantize as q
from .algebra import bn_affine
from .graph import _FRESH_SUFFIX

QUANTIZATIONS = ("weights/tensor", "weights/channel", "QDQ/tensor", "QDQ/channel")
KEEP_SHARE = 0.25  # the keep list is chosen among the most sensitive quarter of the layers


@dataclass
class IdentityGain:
    """The largest gain gamma / sqrt(var + eps) of the identity-branch BNs merged into a layer."""
    batchnorm: str
    gain: float
    channel: int
    median_gain: float


@dataclass
class Measured:
    """One model's INT8 outcomes on the evaluation half: per quantization, (SQNR dB, top-1 agreement)
    of each output."""
    label: str
    outcomes: dict[str, q.Outcome]


@dataclass
class QuantizeCheck:
    layers: list[q.LayerWeights]
    ready_layers: list[q.LayerWeights] = field(default_factory=list)  # after --int8-ready
    identity_gains: dict[str, IdentityGain] = field(default_factory=dict)
    data: str = ""  # what the data was, and how it was split
    measured: list[Measured] = field(default_factory=list)
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (node, SQNR alone), worst first
    keep: list[str] = field(default_factory=list)
    keep_curve: list[tuple[int, float]] = field(default_factory=list)  # (k, QDQ/tensor SQNR, k most sensitive in float)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self, verbose: bool = False) -> str:
        lines = []
        if self.layers:
            worst = max(self.layers, key=lambda layer: layer.outlier_ratio)
            coarsest = min(self.layers, key=lambda layer: layer.weight_levels)
            lines.append(f"{len(self.layers)} layers with constant weights; worst outlier ratio {worst.outlier_ratio:.1f} "
                         f"({worst.node}: its largest weight at {worst.outlier_tap or 'channel ' + str(worst.outlier_channel)}"
                         f"); coarsest grid: {coarsest.node}'s median |w| is {coarsest.weight_levels:.2f} of 127 "
                         "per-tensor INT8 levels")
            if self.ready_layers:
                after = max(self.ready_layers, key=lambda layer: layer.outlier_ratio)
                coarse = min(self.ready_layers, key=lambda layer: layer.weight_levels)
                lines.append(f"after --int8-ready (verified): worst outlier ratio {after.outlier_ratio:.1f} "
                             f"({after.node}); coarsest grid: median |w| at {coarse.weight_levels:.2f} levels "
                             f"({coarse.node})")
        else:
            lines.append("no layer with a constant float weight: nothing for INT8 weights to round")
        shown = sorted(self.layers, key=lambda layer: -layer.outlier_ratio)
        shown = shown if verbose else shown[:10]
        if shown:
            lines.append(f"  {'layer':<48} {'largest':>9} {'median ch':>9} {'ratio':>7} {'levels':>6} {'|w| lv':>6}  "
                         "where the largest sits")
            for layer in shown:
                gain = self.identity_gains.get(layer.node)
                where = layer.outlier_tap + (f"; identity BN gain {gain.gain:.1f} (median {gain.median_gain:.2f}) "
                                             f"in {gain.batchnorm}" if gain else "")
                lines.append(f"  {_short(layer.node, 48):<48} {layer.largest:>9.3g} {layer.median_channel:>9.3g} "
                             f"{layer.outlier_ratio:>7.1f} {layer.median_levels:>6.1f} {layer.weight_levels:>6.2f}  {where}")
            if len(shown) < len(self.layers):
                lines.append(f"  ({len(self.layers) - len(shown)} more layers; -v lists them)")
            lines.append("  (ratio: largest / median output channel range; levels: of 127, the median channel's on a "
                         "per-tensor grid; |w| lv: the median weight's)")
        if self.data:
            lines.append(f"INT8 on data: {self.data}")
            lines.append(f"  {'model':<22}" + "".join(f"{label:>20}" for label in QUANTIZATIONS))
            for measured in self.measured:
                cells = "".join(f"{_cell(measured.outcomes[label]):>20}" for label in QUANTIZATIONS)
                lines.append(f"  {measured.label:<22}{cells}")
            lines.append("  (the lowest output SQNR against FP32 in dB, higher is better, of the outputs whose shape "
                         "INT8 keeps; top-1 agreement where an output is [N, classes])")
            for measured in self.measured:
                lines += [f"  {measured.label}, {label}: failed: {outcome.error}"
                          for label, outcome in measured.outcomes.items() if outcome.error]
        if self.sensitivity:
            ranked = self.sensitivity if verbose else self.sensitivity[:5]
            lines.append("most sensitive layers (SQNR with only that layer's weights in INT8): " +
                         ", ".join(f"{_short(name, 40)} {value:.1f} dB" for name, value in ranked))
        if self.keep_curve and not any(np.isfinite(value) for _, value in self.keep_curve):
            lines.append("QDQ per tensor could not be measured (above): no keep list")
        elif self.keep_curve:
            lines.append("QDQ per tensor with the k most sensitive layers in float: " +
                         ", ".join(f"k={k}: {value:.1f} dB" for k, value in self.keep_curve) +
                         (f"; the hints keep {len(self.keep)}" if self.keep else
                          "; keeping layers in float does not help here: the hints keep none"))
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers],
                "after_int8_ready": [asdict(layer) for layer in self.ready_layers],
                "identity_gains": {k: asdict(v) for k, v in self.identity_gains.items()},
                "data": self.data,
                "measured": {m.label: {k: asdict(o) for k, o in m.outcomes.items()} for m in self.measured},
                "sensitivity": [{"node": n, "sqnr_db": s} for n, s in self.sensitivity],
                "keep": self.keep, "keep_curve": self.keep_curve, "notes": self.notes}

    def hints(self) -> dict:
        """What onnxruntime's and TensorRT's quantizers take: the keep list, activation ranges."""
        return {
            "onnxruntime": {"nodes_to_exclude": self.keep,
                            "usage": "quantize_static(..., nodes_to_exclude=hints['onnxruntime']['nodes_to_exclude'])"},
            "tensorrt": {"layer_precisions": dict.fromkeys(self.keep, "fp16"),
                         "trtexec": ("--int8 --fp16 --precisionConstraints=obey --layerPrecisions=" +
                                     ",".join(f"{name}:fp16" for name in self.keep)) if self.keep else "--int8",
                         "note": "TensorRT's ONNX parser names layers after the ONNX nodes"},
            "activation_ranges": {name: list(r) for name, r in self.ranges.items()},
            "activation_ranges_method": "MinMax over the calibration half of the data: every tensor a layer "
                                        "reads or writes (for ITensor.set_dynamic_range, take max(|min|, |max|))",
        }


def plot_svg(result: QuantizeCheck) -> str:
    """Each layer's resolution on a per-tensor INT8 grid (how many of its 127 levels the median
    |w| is worth, on a log scale) as given, and after --int8-ready where it was made: an SVG
    written by hand, so that a picture needs no plotting library."""
    width, height, left, bottom, top = 900, 360, 60, 40, 30
    series = [("as given", "#c0392b", _levels(result.layers))]
    if result.ready_layers:
        series.append(("after --int8-ready", "#2471a3", _levels(result.ready_layers)))
    count = max(len(values) for _, _, values in series) or 1
    low, high = np.log10(0.01), np.log10(q.LEVELS)

    def y(value: float) -> float:
        fraction = (np.log10(min(max(value, 0.01), q.LEVELS)) - low) / (high - low)
        return height - bottom - fraction * (height - bottom - top)

    slot = (width - left - 20) / count
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="{left}" y="18">median |w| in INT8 levels (of 127, per-tensor grid), per layer in graph order'
             '</text>']
    for tick in (0.01, 0.1, 1, 10, 127):
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    bar = slot / (len(series) + 1)
    for index, (label, colour, values) in enumerate(series):
        for i, (value, layer) in enumerate(zip(values, result.layers)):
            x = left + i * slot + index * bar
            parts.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar:.1f}" '
                         f'height="{height - bottom - y(value):.1f}" fill="{colour}">'
                         f'<title>{escape(layer.node)}: {value:.3g}</title></rect>')
        parts.append(f'<rect x="{left + 10 + 160 * index}" y="{height - 22}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 24 + 160 * index}" y="{height - 13}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _levels(layers: list[q.LayerWeights]) -> list[float]:
    return [layer.weight_levels for layer in layers]


def _cell(outcome: q.Outcome) -> str:
    if outcome.error:
        return "failed"
    if all(np.isnan(value) for value in outcome.sqnr):
        return "shapes differ"
    agreement = next((a for a in outcome.agreement if a is not None), None)
    return f"{outcome.worst:.1f}" + (f" / {100 * agreement:.0f}%" if agreement is not None else "")


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def check(model: onnx.ModelProto, samples: Sequence[dict] | None = None, data: str = "",
          train: onnx.ModelProto | None = None, variants: dict[str, onnx.ModelProto] | None = None) -> QuantizeCheck:
    """The report; ``samples`` (feed sets) with ``data`` saying what they are; ``train`` the
    training export the model was fused from; ``variants`` the model rewritten for INT8, by label
    ("after --int8-ready")."""
    result = QuantizeCheck(q.describe_weights(model))
    ready = (variants or {}).get("optimize --int8-ready")
    if ready is not None:
        result.ready_layers = q.describe_weights(ready)
    if train is not None:
        result.identity_gains, note = identity_gains(model, train)
        if note:
            result.notes.append(note)
    if not samples:
        return result
    half = len(samples) // 2
    calibration, evaluation = list(samples[:half]), list(samples[half:])
    result.data = (f"{data}: {len(samples)} samples, the first {half} to calibrate, the other {len(evaluation)} "
                   "to evaluate")
    exclude = _last_layer(model)
    reference = q.run(model, evaluation)
    for label, candidate in {"as given": model, **(variants or {})}.items():
        own_reference = reference if candidate is model else q.run(candidate, evaluation)
        result.measured.append(Measured(label, _quantized(candidate, calibration, evaluation, own_reference)))
    if exclude:
        result.notes.append(f"QDQ leaves the last layer ({exclude[0]}) in float, as is usual for a classifier")
    names = [node.name for node, _, _ in q.weight_layers(model)]
    sensitivity = []
    for name in names:
        alone = set(names) - {name}
        sensitivity.append((name, q.measured(reference, partial(q.quantize_weights, model, keep=alone),
                                             evaluation).worst))
    result.sensitivity = sorted(sensitivity, key=lambda item: item[1])
    if names:
        result.keep_curve = [(0, result.measured[0].outcomes["QDQ/tensor"].worst)]
        largest = max(1, round(KEEP_SHARE * len(names)))
        for count in sorted({min(k, largest) for k in (1, 2, 4, 8, 16, 32)}):
            kept = set(exclude) | {name for name, _ in result.sensitivity[:count]}
            outcome = q.measured(reference, partial(q.quantize_qdq, model, calibration, exclude=kept), evaluation)
            result.keep_curve.append((count, outcome.worst))
        best = max(result.keep_curve, key=lambda point: point[1])
        result.keep = [name for name, _ in result.sensitivity[:best[0]]] if np.isfinite(best[1]) else []
    result.ranges = q.activation_ranges(model, calibration)
    return result


def measure(model: onnx.ModelProto, calibration: list[dict], evaluation: list[dict], target: str) -> q.Outcome:
    """What INT8 does to ``model``'s float outputs on ``evaluation``, quantized as ``target`` says
    ("qdq": quantize_static per tensor, the last Gemm/MatMul in float; "weights": weight-only per
    tensor), against its own FP32 outputs."""
    label = "weights/tensor" if target == "weights" else "QDQ/tensor"
    return q.measured(q.run(model, evaluation), _quantizer(model, label, calibration), evaluation)


def _quantized(model: onnx.ModelProto, calibration: list[dict], evaluation: list[dict],
               reference: list[list[np.ndarray]]) -> dict[str, q.Outcome]:
    return {label: q.measured(reference, _quantizer(model, label, calibration), evaluation) for label in QUANTIZATIONS}


def _quantizer(model: onnx.ModelProto, label: str, calibration: list[dict]) -> Callable[[], onnx.ModelProto]:
    """What makes the model quantized as ``label`` (QUANTIZATIONS) says; QDQ leaves the last
    Gemm/MatMul (a classifier head) in float."""
    kind, granularity = label.split("/")
    per_channel = granularity == "channel"
    if kind == "weights":
        return partial(q.quantize_weights, model, per_channel)
    return partial(q.quantize_qdq, model, calibration, per_channel, exclude=_last_layer(model))


def _last_layer(model: onnx.ModelProto) -> list[str]:
    """The last weighted layer when it is a Gemm or MatMul (a classifier head)."""
    layers = q.weight_layers(model)
    return [layers[-1][0].name] if layers and layers[-1][0].op_type in ("Gemm", "MatMul") else []


def identity_gains(model: onnx.ModelProto, train: onnx.ModelProto) -> tuple[dict[str, IdentityGain], str]:
    """For each layer of ``model``, the identity-branch BNs of ``train`` merged into it (found by
    re-running the rewrite on ``train`` and matching the layers by name), with their largest gain.
    An identity BN is one whose input no Conv writes: it normalizes the block's input itself."""
    from . import api
    writers = {out: node for node in train.graph.node for out in node.output}
    weights = {t.name: t for t in train.graph.initializer}
    identity = {}
    for node in train.graph.node:
        source = writers.get(node.input[0]) if node.input else None
        if node.op_type == "BatchNormalization" and (source is None or source.op_type != "Conv") \
                and all(name in weights for name in node.input[1:5]):
            gamma, beta, mean, var = (numpy_helper.to_array(weights[name]) for name in node.input[1:5])
            scale, _ = bn_affine(gamma, beta, mean, var, q.attribute(node, "epsilon", 1e-5))
            identity[node.name] = np.abs(scale)
    if not identity:
        return {}, "the training export has no identity-branch BatchNormalization (one not after a Conv)"
    _, report = api.optimize(train, verify=False)
    merged: dict[str, set[str]] = {}
    for rewrite in (r for p in report.passes for r in p.rewrites):
        for added in rewrite.added:
            merged.setdefault(_FRESH_SUFFIX.sub("", added), set()).update(rewrite.replaced)
    gains = {}
    layer_names = [node.name for node, _, _ in q.weight_layers(model)]
    for name in layer_names:
        found = [bn for bn in sorted(merged.get(_FRESH_SUFFIX.sub("", name), ())) if bn in identity]
        if found:
            bn = max(found, key=lambda b: identity[b].max())
            gain = identity[bn]
            gains[name] = IdentityGain(bn, float(gain.max()), int(np.argmax(gain)), float(np.median(gain)))
    originals = {node.name for node in train.graph.node}
    unmatched = sum(1 for name in layer_names if _FRESH_SUFFIX.sub("", name) not in merged and name not in originals)
    note = (f"{unmatched} of {len(layer_names)} layers are not layers that re-running the rewrite on the training "
            "export writes (another tool's output, or renamed): no identity gains for them") if unmatched else ""
    return gains, note
