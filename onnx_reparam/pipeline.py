"""Runs the passes in a fixed order, sweeping the graph until no pass changes anything; then the
finishing passes asked for (equalize), the same way."""
from __future__ import annotations

from collections.abc import Sequence

from .errors import Refused, ReparamError, internal_error, option
from .graph import Graph
from .passes import Pass, PassLog, Policy, default_passes, finishing_passes
from .report import PassReport, Rewrite

MAX_SWEEPS = 100  # each sweep that changes something removes nodes, so this is never reached


# The option that asks for each finishing pass.
FINISHING_OPTIONS = {"split_identity": "keep_identity", "equalize": "int8_ready"}


def select_passes(only: str | Sequence[str] = (), skip: str | Sequence[str] = (), int8_ready: bool = False,
                  keep_identity: bool = False) -> tuple[Pass, ...]:
    only, skip = _names(only, "only"), _names(skip, "skip")
    asked = {"int8_ready": int8_ready, "keep_identity": keep_identity}
    finishing = finishing_passes()
    passes = default_passes() + tuple(p for p in finishing if asked[FINISHING_OPTIONS[p.name]])
    names = {p.name for p in default_passes() + finishing}
    unknown = sorted((set(only) | set(skip)) - names)
    if unknown:
        raise ReparamError(f"unknown pass {', '.join(unknown)} (passes: {', '.join(sorted(names))})")
    both = sorted(set(only) & set(skip))
    if both:
        raise ReparamError(f"pass {', '.join(both)} is both in only and in skip")
    for name in sorted((set(only) | set(skip)) & {p.name for p in finishing}):
        if not asked[FINISHING_OPTIONS[name]]:
            raise ReparamError(f"pass {name} runs only with {option(FINISHING_OPTIONS[name] + '=True')}")
    return tuple(p for p in passes if (not only or p.name in only) and p.name not in skip)


def _names(value: str | Sequence[str], option: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise ReparamError(f"{option} takes pass names (a str or a list of str)")
    return tuple(value)


def run_passes(graph: Graph, passes: tuple[Pass, ...], policy: Policy | None = None,
               progress=None) -> tuple[list[PassReport], list[Rewrite]]:
    """Rewrites until a sweep changes nothing. Rewrites add up over sweeps; refusals are those of
    the last sweep, so a pattern refused early and rewritten later is not reported as refused.
    ``policy`` may withhold rewrites (see PassLog). A pass that fails outside any one rewrite is
    reported as refused and the sweep goes on without it. Finishing passes (``Pass.final``) sweep
    once the others are done. Returns the reports and the rewrites in the order they were applied."""
    reports = {p.name: PassReport(p.name) for p in passes}
    applied: list[Rewrite] = []
    for stage in ([p for p in passes if not p.final], [p for p in passes if p.final]):
        applied += _to_fixed_point(graph, stage, reports, policy, progress)
    graph.cleanup()
    return list(reports.values()), applied


def _to_fixed_point(graph: Graph, passes: list[Pass], reports: dict[str, PassReport], policy: Policy | None,
                    progress) -> list[Rewrite]:
    applied: list[Rewrite] = []
    for sweep in range(1, MAX_SWEEPS + 1):
        changed = False
        for p in passes:
            if progress is not None:
                progress(f"sweep {sweep}: {p.name} ({len(graph.nodes())} nodes)")
            log = PassLog(graph, p.name, policy)
            try:
                p.run(graph, log)
            except Exception as exc:  # noqa: BLE001 - a defect of ours costs only this pass
                graph.discard()
                log.refused("(whole graph)", Refused(internal_error(exc), kind="internal error"))
            report = reports[p.name]
            report.rewrites += log.rewrites
            applied += log.rewrites
            report.refusals = log.refusals
            if log.rewrites:
                changed = True
                graph.cleanup()
        if not changed:
            break
    return applied
