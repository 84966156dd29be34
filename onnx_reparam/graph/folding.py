"""Values computed from constants alone, and their evaluation in onnxruntime.

The nodes are run as they are, in a session of their own on the CPU with every graph optimization
off (nothing but the nodes is computed) and its own log level (onnxruntime's process-wide logger is
left alone). Nodes that draw random numbers, hold subgraphs or belong to another domain are not
evaluated; nor is a value larger than the caller's limit, or one the caller may override.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import one_line
from .values import DEFAULT_DOMAINS

RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"})  # Dropout: random in training mode


def foldable(nodes: list[gs.Node], is_constant: Callable[[gs.Tensor], bool], limit: int,
             outputs: set[str]) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The nodes (in ``nodes``' order, which is topological) whose every input is a constant or
    computed by such nodes, and the values among their outputs to evaluate: those read by another
    node (a graph output stays computed, its name kept)."""
    known: set[str] = set()
    chosen: list[gs.Node] = []
    for node in nodes:
        if node.op == "Constant" or node.domain not in DEFAULT_DOMAINS or node.op in RANDOM \
                or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            continue
        inputs = [t for t in node.inputs if t.name]
        if not inputs or not all(t.name in known or is_constant(t) for t in inputs):
            continue
        if any(_static_bytes(t) > limit for t in node.outputs):
            continue
        chosen.append(node)
        known.update(t.name for t in node.outputs)
    inside = {id(n) for n in chosen}
    targets = [t for n in chosen for t in n.outputs
               if t.name and t.name not in outputs and any(id(reader) not in inside for reader in t.outputs)]
    return chosen, targets


def _static_bytes(tensor: gs.Tensor) -> int:
    shape = tensor.shape
    if shape is None or tensor.dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return 0  # unknown until computed: judged by its value
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def evaluate(nodes: list[gs.Node], targets: list[gs.Tensor], opset: int,
             import_domains) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The targets' values, computed by ``nodes`` (their constant inputs become initializers), and
    why those that could not be computed were not. One session for all; where it fails, one per
    target, so a value onnxruntime cannot compute costs only itself."""
    try:
        return dict(zip((t.name for t in targets), _run(nodes, targets, opset, import_domains))), {}
    except Exception as exc:  # noqa: BLE001 - one value onnxruntime cannot compute: try each alone
        if len(targets) == 1:
            return {}, {targets[0].name: one_line(exc, 200)}
    values, problems = {}, {}
    for target in targets:
        found, failed = evaluate(cone(nodes, [target]), [target], opset, import_domains)
        values.update(found)
        problems.update(failed)
    return values, problems


def cone(nodes: list[gs.Node], targets: list[gs.Tensor]) -> list[gs.Node]:
    """The nodes the targets are computed by, in their order."""
    needed, wanted = set(), {t.name for t in targets}
    for node in reversed(nodes):
        if any(t.name in wanted for t in node.outputs):
            needed.add(id(node))
            wanted.update(t.name for t in node.inputs if t.name)
    return [n for n in nodes if id(n) in needed]


def _run(nodes: list[gs.Node], targets: list[gs.Tensor], opset: int, import_domains) -> list[np.ndarray]:
    import onnxruntime as ort
    sources = [t.inputs[0] for n in nodes for t in n.inputs if t.inputs and t.inputs[0].op == "Constant"]
    nodes = list({id(n): n for n in sources + nodes}.values())  # Constant nodes' values are read as they are
    graph = gs.Graph(nodes=nodes, outputs=targets, opset=opset, import_domains=import_domains)
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)  # one onnxruntime reads
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # its warnings are of no use here: an error fails the run
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run([t.name for t in targets], {})]
