"""quantize-check, its measurements and hints, and calibration data as users have it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import FIXTURES, GraphBuilder
from test_equalize import identity_conv, outlier_conv

import onnx_reparam
from onnx_reparam import quantize as q
from onnx_reparam.calibration import ImagePreprocessing, load_calibration


def small_classifier(dtype=np.float32) -> onnx.ModelProto:
    """Conv with an identity-like outlier, ReLU, pool, Gemm: a fused RepVGG-like block and head."""
    b = GraphBuilder(dtype=dtype)
    x = b.input("x", ["N", 3, 8, 8])
    y = b.node("Relu", [b.conv(x, 3, 6, 3, pads=[1, 1, 1, 1])])
    y = b.node("Relu", [identity_conv(b, y, 6)])
    y = b.node("Relu", [outlier_conv(b, y, 6, 6, channel=4, gain=30.0)])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    return b.model([b.node("Gemm", [y, b.const(b.rand(10, 6)), b.const(b.rand(10))], transB=1)])


@pytest.mark.quick
def test_fake_quantize_per_tensor_and_per_channel():
    weight = np.array([[1.0, -0.5, 0.001], [100.0, 3.0, -2.0]], np.float32)
    per_tensor = q.fake_quantize(weight, None)
    assert per_tensor[0, 2] == 0 and per_tensor[1, 0] == 100  # the small row drowns in the large one's grid
    per_channel = q.fake_quantize(weight, 0)
    assert np.abs(per_channel[0] - weight[0]).max() <= 1.0 / 127 / 2 + 1e-7
    steps = per_tensor / np.float32(100 / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # on the grid


@pytest.mark.quick
def test_describe_weights_finds_the_identity_tap():
    layers = {layer.node: layer for layer in q.describe_weights(small_classifier())}
    identity = next(layer for layer in layers.values() if "identity" in layer.outlier_tap)
    assert identity.weight_levels < 2  # the identity taps set a grid the other weights barely register on
    assert any(layer.outlier_tap.startswith("row") for layer in layers.values())  # the Gemm


@pytest.mark.quick
def test_sqnr_and_agreement():
    reference = [np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 2.0, 1.0]])]
    assert q.sqnr_db(reference, reference) == float("inf")
    noisy = [r + 0.1 for r in reference]
    assert q.sqnr_db(reference, noisy) == pytest.approx(10 * np.log10(28 / 0.06))
    assert q.top1_agreement(reference, [np.array([[0, 0, 1.0]]), np.array([[0, 1.0, 0]])]) == 0.5
    assert q.top1_agreement([np.ones((1, 2, 3))], [np.ones((1, 2, 3))]) is None
    detections = [np.ones((5, 4)), np.ones((3, 4))]  # another count of boxes after NMS: no SQNR
    assert np.isnan(q.sqnr_db(detections, [np.ones((5, 4)), np.ones((2, 4))]))
    assert q.Outcome([float("nan"), 12.0], [None, None]).worst == 12.0


@pytest.mark.quick
def test_check_without_data_names_the_outlier_and_its_removal():
    result = onnx_reparam.quantize_check(small_classifier())
    text = result.summary()
    assert "worst outlier ratio" in text and "levels" in text and "identity" in text
    assert "after --int8-ready (verified): worst outlier ratio" in text
    assert max(layer.outlier_ratio for layer in result.ready_layers) < max(layer.outlier_ratio
                                                                          for layer in result.layers)
    assert not result.measured and "INT8 on data" not in text
    assert len(result.to_dict()["layers"][0]["channel_ranges"]) == 6


def test_plot_is_an_svg_with_a_bar_per_layer_and_model():
    import xml.etree.ElementTree as ET

    from onnx_reparam.int8 import plot_svg
    result = onnx_reparam.quantize_check(small_classifier())
    root = ET.fromstring(plot_svg(result))
    bars = [e for e in root if e.tag.endswith("rect") and e.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == 2 * len(result.layers)


@pytest.mark.quick
def test_check_with_data_measures_every_quantization(tmp_path):
    model = small_classifier()
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = onnx_reparam.quantize_check(model, data=path)
    labels = [m.label for m in result.measured]
    assert labels == ["as given", "optimize --int8-ready", "+ --keep-identity"]
    for measured in result.measured:
        assert set(measured.outcomes) == {"weights/tensor", "weights/channel", "QDQ/tensor", "QDQ/channel"}
        assert all(np.isfinite(o.sqnr[0]) for o in measured.outcomes.values())
    assert len(result.sensitivity) == 4 and [k for k, _ in result.keep_curve] == [0, 1]
    best = max(result.keep_curve, key=lambda point: point[1])[0]
    assert result.keep == [name for name, _ in result.sensitivity[:best]]
    hints = result.hints()
    assert hints["onnxruntime"]["nodes_to_exclude"] == result.keep
    assert set(hints["tensorrt"]["layer_precisions"]) == set(result.keep)
    assert "x" in hints["activation_ranges"] and hints["activation_ranges"]["x"][0] < 0
    json.dumps(result.to_dict(), default=float)
    assert "8 samples, the first 8" not in result.data and "16 samples, the first 8 to calibrate" in result.data


@pytest.mark.quick
def test_identity_gains_from_the_training_export(tmp_path):
    train = FIXTURES / "timm_repvgg_a0_ts.onnx"
    fused, _ = onnx_reparam.optimize(train, verify=False)
    result = onnx_reparam.quantize_check(fused, train=train)
    assert len(result.identity_gains) == 17  # one per block with an identity branch
    worst = max(result.identity_gains.values(), key=lambda g: g.gain)
    layer = next(layer for layer in result.layers if layer.node in result.identity_gains
                 and result.identity_gains[layer.node] is worst)
    assert worst.gain == pytest.approx(layer.largest, rel=0.05)  # the gain is the layer's largest weight
    assert not result.notes


@pytest.mark.quick
@pytest.mark.parametrize("problem,message", [
    ("missing", "no such file or folder"),
    ("not npz", "cannot read calibration data"),
    ("wrong name", "has arrays ['y']; the model's inputs are ['x']"),
    ("wrong shape", "samples of shape [3, 9, 8] do not fit the input's shape"),
    ("wrong type", "is float64, the model takes float32"),
    ("no samples", "the same number of samples"),
    ("empty folder", "no images"),
])
def test_bad_calibration_data(tmp_path, problem, message):
    model = small_classifier()
    path = tmp_path / "calib.npz"
    arrays = {"x": np.zeros((4, 3, 8, 8), np.float32)}
    if problem == "not npz":
        path.write_text("hello")
    elif problem == "wrong name":
        arrays = {"y": arrays["x"]}
    elif problem == "wrong shape":
        arrays = {"x": np.zeros((4, 3, 9, 8), np.float32)}
    elif problem == "wrong type":
        arrays = {"x": np.zeros((4, 3, 8, 8))}
    elif problem == "no samples":
        arrays = {"x": np.zeros((0, 3, 8, 8), np.float32)}
    elif problem == "empty folder":
        path = tmp_path / "images"
        path.mkdir()
    if problem not in ("missing", "not npz", "empty folder"):
        np.savez(path, **arrays)
    with pytest.raises(onnx_reparam.ReparamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_calibration(path, model)


@pytest.mark.quick
def test_images_preprocessed_as_stated(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    for i, size in enumerate(((20, 12), (9, 30))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    model = small_classifier()
    feeds = load_calibration(tmp_path, model, ImagePreprocessing(size=8))
    assert len(feeds) == 2 and feeds[0]["x"].shape == (1, 3, 8, 8) and feeds[0]["x"].dtype == np.float32
    white = tmp_path / "white"
    white.mkdir()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(white / "w.png")
    value = load_calibration(white, model, ImagePreprocessing(size=8))[0]["x"][0, :, 0, 0]
    np.testing.assert_allclose(value, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                               rtol=1e-5)
    (white / "broken.png").write_bytes(b"not a png")
    with pytest.raises(onnx_reparam.ReparamError, match="cannot read calibration image"):
        load_calibration(white, model)


@pytest.mark.parametrize("fixture", ["timm_repvgg_a0_ts.onnx"])
def test_int8_ready_on_timm_repvgg_with_natural_images(fixture, tmp_path):
    """timm's RepVGG-A0 (BN statistics from natural images), fused: the identity gains make the
    fused weights an INT8 grid cannot hold; --int8-ready (verified) and the keep list help, on
    natural-image crops given as a folder of PNG files."""
    fused, _ = onnx_reparam.optimize(FIXTURES / fixture)
    result = onnx_reparam.quantize_check(fused, data=FIXTURES / "crops", train=FIXTURES / fixture,
                                         images=ImagePreprocessing(size=64))
    by_label = {m.label: m.outcomes for m in result.measured}
    given, ready = by_label["as given"], by_label["optimize --int8-ready"]
    assert given["weights/tensor"].worst < 0 < 8 < ready["weights/tensor"].worst
    assert ready["QDQ/tensor"].worst > given["QDQ/tensor"].worst + 10
    every = result.keep_curve[0][1]
    assert result.keep and max(value for _, value in result.keep_curve) > every + 1  # the keep list helps
    assert max(layer.outlier_ratio for layer in result.layers) > 50
    ready_layers = q.describe_weights(onnx_reparam.optimize(fused, int8_ready=True)[0])
    assert max(layer.outlier_ratio for layer in ready_layers) < 3
    assert len(result.identity_gains) == 17


def test_optimize_for_int8_chooses_by_measurement(tmp_path):
    """On timm's RepVGG-A0 with natural-image crops: QDQ wants --int8-ready, weight-only the
    identity kept apart too; each candidate verified, each figure in the report."""
    chosen = {}
    for target in ("qdq", "weights"):
        _, report = onnx_reparam.optimize_for_int8(FIXTURES / "timm_repvgg_a0_ts.onnx", FIXTURES / "crops",
                                                   target=target)
        assert set(report.int8) == {"fused", "--int8-ready", "--int8-ready --keep-identity"}
        assert report.int8[report.int8_choice] == max(report.int8.values())
        assert report.verification.passed and "written: " in report.summary()
        chosen[target] = report.int8_choice
    assert chosen == {"qdq": "--int8-ready", "weights": "--int8-ready --keep-identity"}
    with pytest.raises(onnx_reparam.ReparamError, match="keep_identity is chosen by measurement"):
        onnx_reparam.optimize_for_int8(FIXTURES / "timm_repvgg_a0_ts.onnx", FIXTURES / "crops", keep_identity=True)


@pytest.mark.quick
def test_a_quantizer_that_fails_is_a_finding_not_a_crash(tmp_path, monkeypatch):
    """A model onnxruntime's quantizer makes that onnxruntime cannot run (it happens: per-channel
    QDQ at opset 12, float16 scales): the QDQ figures say why, the weight-only ones stand."""
    def broken(model, *args, **kwargs):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        bad.graph.node[0].op_type = "NoSuchOp"
        return bad
    monkeypatch.setattr(q, "quantize_qdq", broken)
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    result = onnx_reparam.quantize_check(small_classifier(), data=path)
    given = result.measured[0].outcomes
    assert "onnxruntime cannot run the quantized model" in given["QDQ/tensor"].error
    assert not given["weights/tensor"].error
    assert "failed" in result.summary() and "no keep list" in result.summary() and result.keep == []
