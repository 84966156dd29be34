"""The rewrite passes, in the order the pipeline runs them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..graph import Graph
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


def default_passes() -> tuple[Pass, ...]:
    from . import compose, conv_into_fc, fold_affine, fold_constants, merge_branches
    return tuple(Pass(module.__name__.rsplit(".", 1)[1], module.run, _first_sentence(module.__doc__))
                 for module in (fold_constants, compose, fold_affine, merge_branches, conv_into_fc))


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."
