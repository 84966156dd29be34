"""Runs the passes in a fixed order, sweeping the graph until no pass changes anything."""
from __future__ import annotations

from .errors import ReparamError
from .graph import Graph
from .passes import Pass, PassLog, default_passes
from .report import PassReport

MAX_SWEEPS = 100  # each sweep that changes something removes nodes, so this is never reached


def select_passes(only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> tuple[Pass, ...]:
    passes = default_passes()
    names = {p.name for p in passes}
    unknown = sorted((set(only) | set(skip)) - names)
    if unknown:
        raise ReparamError(f"unknown pass {', '.join(unknown)} (passes: {', '.join(sorted(names))})")
    return tuple(p for p in passes if (not only or p.name in only) and p.name not in skip)


def run_passes(graph: Graph, passes: tuple[Pass, ...]) -> list[PassReport]:
    """Rewrites until a sweep changes nothing. Rewrites add up over sweeps; refusals are those of
    the last sweep, so a pattern refused early and rewritten later is not reported as refused."""
    reports = [PassReport(p.name) for p in passes]
    for _ in range(MAX_SWEEPS):
        changed = False
        for p, report in zip(passes, reports):
            log = PassLog()
            p.run(graph, log)
            report.rewrites += log.rewrites
            report.refusals = log.refusals
            if log.rewrites:
                changed = True
                graph.cleanup()
        if not changed:
            break
    graph.cleanup()
    return reports
