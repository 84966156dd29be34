"""Whether onnxruntime runs an op at given element types: asked of onnxruntime itself, once per op,
opset and types, by making a session of a model holding just that node (on the CPU, with every
graph optimization off). A rewrite may only write nodes it can run: ONNX defines no integer Conv,
and onnxruntime's CPU build has no double Conv (its float16 ones it runs through casts).
"""
from __future__ import annotations

import functools
import re

import numpy as np
import onnx
from onnx import helper

from .errors import first_line

PROBE_IR = 8  # any IR version onnxruntime reads: the probe is one node of the default domain


def dtype_code(dtype) -> int | None:
    """The ONNX element type of a tensor's dtype (numpy, ml_dtypes or already an ONNX code)."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


@functools.cache
def unrunnable(op: str, opset: int, input_types: tuple, ranks: tuple, output_types: tuple,
               attrs: tuple) -> str | None:
    """Why onnxruntime cannot run ``op`` on inputs of these ONNX element types and ranks (None
    for an input left out), or None when it can; asked once per arguments."""
    import onnxruntime as ort
    names = [f"in{i}" if t is not None else "" for i, t in enumerate(input_types)]
    inputs = [helper.make_tensor_value_info(name, t, [f"d{i}_{k}" for k in range(r)] if r is not None else None)
              for i, (name, t, r) in enumerate(zip(names, input_types, ranks)) if name]
    outputs = [helper.make_tensor_value_info(f"out{i}", t, None) for i, t in enumerate(output_types)]
    node = helper.make_node(op, names, [o.name for o in outputs], **dict(attrs))
    model = helper.make_model(helper.make_graph([node], "probe", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=PROBE_IR)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal is the answer asked for
        types = "/".join(dict.fromkeys(onnx.TensorProto.DataType.Name(t).lower() for t in input_types if t is not None))
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc))
        return f"onnxruntime cannot run the {op} it would write on {types} data ({reason})"
    return None
