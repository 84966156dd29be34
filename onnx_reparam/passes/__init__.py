"""The rewrite passes, in the order the pipeline runs them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import algebra
from ..graph import Graph, Node, attr
from ..report import Refusal


@dataclass
class PassLog:
    """What one pass did in one sweep over the graph."""
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def rewrote(self, what: str, node: str) -> None:
        self.rewrites.append(f"{what}: {node}")

    def refused(self, node: str, reason: str) -> None:
        self.refusals.append(Refusal(node, reason))


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassLog], None]
    doc: str


def inference_bn(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(scale, shift) of a BatchNormalization in inference mode, or why it is not one."""
    if attr(node, "training_mode", 0) or len([t for t in node.outputs if t.name]) > 1:
        return "BatchNormalization in training mode"
    params = [graph.constant(t) for t in node.inputs[1:5]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constants"
    return algebra.bn_affine(*params, attr(node, "epsilon", 1e-5))


def default_passes() -> tuple[Pass, ...]:
    from . import fold_affine, merge_branches
    return (
        Pass("fold_affine", fold_affine.run, fold_affine.__doc__.strip().splitlines()[0]),
        Pass("merge_branches", merge_branches.run, merge_branches.__doc__.strip().splitlines()[0]),
    )
