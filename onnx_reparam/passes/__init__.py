"""The rewrite passes, in the order the pipeline runs them, and the log each one writes to.

A pass matches patterns and builds each replacement with ``Graph.add_node``; ``PassLog.rewrote``
is the one place a rewrite reaches the graph (or is withheld by the run's policy), and
``PassLog.attempt`` turns an exception while matching or building one rewrite into a refusal of
that rewrite.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import Refused, internal_error
from ..graph import Graph, Node
from ..report import Refusal, Rewrite

T = TypeVar("T")

# Given a rewrite about to be applied, why it must not be (None: apply it).
Policy = Callable[[Rewrite], "Refused | None"]


@dataclass
class PassLog:
    """What one pass did in one sweep over the graph."""
    graph: Graph
    name: str
    policy: Policy | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def rewrote(self, pattern: str, replaced: list[Node]) -> bool:
        """Applies the rewrite built since the last one, replacing ``replaced``; False when it
        writes an op onnxruntime cannot run at its types, or the policy withholds it (the graph
        stays as it was, and the reason is a refusal)."""
        origins = sorted({o for n in replaced for o in self.graph.origin(n)})
        rewrite = Rewrite(self.name, pattern, origins)
        withheld = self.graph.unrunnable() or (self.policy(rewrite) if self.policy is not None else None)
        if withheld:
            self.graph.discard()
            self.refusals.append(Refusal.of(", ".join(origins), withheld, pattern))
            return False
        rewrite.added = [n.name for n in self.graph.commit(replaced, f"{self.name}: {pattern}")]
        self.rewrites.append(rewrite)
        return True

    def refused(self, node: Node | str, refused: Refused, pattern: str = "") -> None:
        label = node if isinstance(node, str) else self.graph.label(node)
        self.refusals.append(Refusal.of(label, refused, pattern))

    def attempt(self, node: Node, build: Callable[..., T], *args: object) -> T | None:
        """Runs one match-and-rewrite; an exception in it refuses that rewrite and no other: a
        Refused the match did not catch as what it says, anything else as an internal error."""
        try:
            return build(*args)
        except Refused as refused:
            self.graph.discard()
            self.refused(node, refused)
        except Exception as exc:  # noqa: BLE001 - a defect of ours must cost only its rewrite
            self.graph.discard()
            self.refused(node, Refused(internal_error(exc), kind="internal error"))
        return None


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassLog], None]
    doc: str
    final: bool = False  # runs once the others have reached their fixed point, and only when asked


def default_passes() -> tuple[Pass, ...]:
    from . import (
        compose,
        conv_into_fc,
        drop_noops,
        fold_affine,
        fold_constants,
        merge_branches,
        transposes,
    )
    return tuple(Pass(module.__name__.rsplit(".", 1)[1], module.run, _first_sentence(module.__doc__ or ""))
                 for module in (fold_constants, drop_noops, transposes, compose, fold_affine, merge_branches,
                                conv_into_fc))


def finishing_passes() -> tuple[Pass, ...]:
    """Passes that prepare the weights for INT8, run only when asked (keep_identity, int8_ready),
    in this order, once the others have reached their fixed point."""
    from . import equalize, split_identity
    return tuple(Pass(module.__name__.rsplit(".", 1)[1], module.run, _first_sentence(module.__doc__ or ""),
                      final=True) for module in (split_identity, equalize))


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."
