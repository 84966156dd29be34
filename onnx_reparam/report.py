"""What a run did: counts before/after, each pass's rewrites and refusals, verification, timings."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx


@dataclass
class Refusal:
    """A pattern that was found but left as it is."""
    node: str
    reason: str


@dataclass
class PassReport:
    name: str
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


@dataclass
class GraphStats:
    nodes: int
    parameters: int
    ops: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphStats:
        params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
        ops = Counter(n.op_type for n in model.graph.node)
        return cls(len(model.graph.node), params, dict(sorted(ops.items())))


@dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |a|
    tolerance: float  # the bound max_abs_error had to meet: atol + rtol * max |a|
    passed: bool


@dataclass
class Verification:
    provider: str
    outputs: list[OutputCheck]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"verification {verdict} on {self.provider}"]
        for o in self.outputs:
            mark = "ok" if o.passed else "MISMATCH"
            lines.append(f"  {o.name}: max abs err {o.max_abs_error:.3g}, max rel err "
                         f"{o.max_rel_error:.3g} (bound {o.tolerance:.3g}) {mark}")
        return "\n".join(lines)


@dataclass
class Report:
    before: GraphStats | None = None
    after: GraphStats | None = None
    passes: list[PassReport] = field(default_factory=list)
    verification: Verification | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rewrites(self) -> int:
        return sum(len(p.rewrites) for p in self.passes)

    def to_dict(self) -> dict:
        result = asdict(self)
        if self.verification is not None:
            result["verification"]["passed"] = self.verification.passed
        return result

    def summary(self) -> str:
        lines = []
        if self.before and self.after:
            lines.append(f"nodes {self.before.nodes} -> {self.after.nodes}, parameters "
                         f"{self.before.parameters:,} -> {self.after.parameters:,}")
        for p in self.passes:
            counts = Counter(r.split(":")[0] for r in p.rewrites)
            done = ", ".join(f"{n} x {what}" for what, n in counts.items()) or "nothing"
            lines.append(f"{p.name}: rewrote {done}")
            for r in p.refusals:
                lines.append(f"  left {r.node}: {r.reason}")
        if not self.rewrites:
            lines.append("nothing to rewrite: the model is unchanged")
        if self.verification is not None:
            lines.append(self.verification.summary())
        if self.seconds:
            lines.append("time " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)
