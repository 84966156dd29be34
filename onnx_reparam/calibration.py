"""Calibration data as users have it: an .npz of input arrays (samples along the first axis), or
a folder of images with a stated preprocessing. Each sample becomes one set of feeds, batch 1."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import ReparamError, first_line
from .inputs import graph_inputs, load_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images become an input: the shorter side resized to ``size`` (bilinear), the centre
    ``size`` x ``size`` cropped, RGB values divided by 255, minus ``mean``, divided by ``std``, laid
    out as NCHW or NHWC. ``size`` and ``layout`` None: the model's input says (its static square
    size; NHWC where its last axis has 3 channels), else 224 and NCHW."""
    size: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str | None = None

    def fitted(self, value: onnx.ValueInfoProto) -> ImagePreprocessing:
        """With size and layout taken from the model's input where they are not given."""
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        layout = self.layout or ("NHWC" if len(dims) == 4 and dims[3] == 3 and dims[1] != 3 else "NCHW")
        spatial = dims[1:3] if layout == "NHWC" else dims[2:4]
        size = self.size or (spatial[0] if len(spatial) == 2 and spatial[0] and spatial[0] == spatial[1] else 224)
        return ImagePreprocessing(size, self.mean, self.std, layout)

    def describe(self) -> str:
        return (f"shorter side resized to {self.size}, centre {self.size}x{self.size} crop, RGB / 255, "
                f"mean {list(self.mean)}, std {list(self.std)}, {self.layout}")


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto,
                     images: ImagePreprocessing | None = None) -> list[Feeds]:
    """The samples in ``path`` as feed sets for ``model`` (one sample each, batch 1)."""
    source = Path(path)
    if not source.exists():
        raise ReparamError(f"calibration data {source}: no such file or folder")
    inputs = graph_inputs(model)
    if source.is_dir():
        if len(inputs) != 1:
            raise ReparamError(f"calibration images feed one input; the model has {len(inputs)}: give an .npz")
        pixels = _images(source, (images or ImagePreprocessing()).fitted(inputs[0]))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
        if not np.issubdtype(dtype, np.floating):
            raise ReparamError(f"calibration images feed a float input; '{inputs[0].name}' is {dtype}: give an .npz")
        arrays = {inputs[0].name: pixels.astype(dtype)}
    else:
        arrays = load_inputs(source, "calibration data (an .npz of arrays named as the model's inputs, or a folder "
                                     "of images)")
    return _samples(arrays, inputs, source)


def _samples(arrays: dict[str, np.ndarray], inputs: Sequence[onnx.ValueInfoProto], source: Path) -> list[Feeds]:
    names = [i.name for i in inputs]
    if sorted(arrays) != sorted(names):
        raise ReparamError(f"calibration data {source} has arrays {sorted(arrays)}; the model's inputs are {names}")
    counts = {name: len(a) if a.ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise ReparamError(f"calibration data {source}: every array needs the same number of samples along its "
                           f"first axis (found {counts})")
    for value in inputs:
        array = arrays[value.name]
        tensor_type = value.type.tensor_type
        expected = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if array.dtype != expected:
            raise ReparamError(f"calibration data {source}: '{value.name}' is {array.dtype}, the model takes {expected}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        sample = (1,) + array.shape[1:]
        if len(dims) != len(sample) or any(d is not None and d != s for d, s in zip(dims, sample)):
            shown = ["?" if d is None else d for d in dims]
            raise ReparamError(f"calibration data {source}: '{value.name}' samples of shape {list(array.shape[1:])} "
                               f"do not fit the input's shape {shown} (samples go along the first axis)")
    count = next(iter(counts.values()))
    return [{name: arrays[name][i:i + 1] for name in names} for i in range(count)]


def _images(folder: Path, preprocessing: ImagePreprocessing) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ReparamError("reading calibration images needs Pillow: pip install pillow "
                           "(or give an .npz of input arrays)") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReparamError(f"calibration data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    size = preprocessing.size or 224
    samples = []
    for file in files:
        try:
            with Image.open(file) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ReparamError(f"cannot read calibration image {file}: {first_line(exc)}") from None
        factor = size / min(image.size)
        width, height = max(size, round(image.width * factor)), max(size, round(image.height * factor))
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / np.float32(255)
        normalized = (pixels - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
        samples.append(normalized.transpose(2, 0, 1) if preprocessing.layout == "NCHW" else normalized)
    return np.stack(samples).astype(np.float32)
