"""Seeded fuzz test of branch merging: random branch sets that are exact by construction must merge
into one Conv, sets with one condition broken must keep their branches with the reason said, and
the outputs must be equal in every case (optimize verifies each rewrite in onnxruntime and raises
otherwise).

An exact set is built backwards from a merged conv (kernel K, pads (PB, PE), stride s, dilation d,
groups g): every conv branch gets a kernel k <= K at an offset o inside it and the pads that put it
there (pb = PB - o*d, pe = PE - (K - k - o)*d), a group count that is a multiple of g, optional bias
and BN; identity, BN(x) and Mul(x, c) branches join when the stride is 1 and PB is a multiple of d. One branch has the full
kernel and g groups, so the merge costs no more than the branches. Leaves of another input z and
signs (Sub) are mixed in, in a random nest of Add/Sum/Sub.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import GraphBuilder, ops, refusals, rewrite

BROKEN = {
    "off_grid": "non-multiple of dilation",  # a branch half a dilation step off the kernel's grid
    "shared_output": "is a graph output",  # a branch's output is also a graph output
    "costlier_groups": "multiply-adds",  # depthwise kxk + dense 1x1 would be a dense kxk
    "unknown_length": "input length is unknown",  # end pads that agree only for some lengths
}


class BranchSet:
    def __init__(self, seed: int, broken: str | None = None):
        self.rng = rng = np.random.default_rng(seed)
        self.b = b = GraphBuilder(seed)
        self.rank = rank = int(rng.choice([1, 2, 2, 3]))
        self.channels = c = int(rng.choice([4, 6, 8]))
        self.stride = 2 if broken == "unknown_length" else int(rng.choice([1, 2]))
        self.dilation = {"off_grid": 2, "unknown_length": 1}.get(broken, int(rng.choice([1, 1, 2])))
        self.size = 8
        dims = ["L"] * rank if broken == "unknown_length" else [self.size] * rank
        self.x, self.z = b.input("x", [1, c] + dims), b.input("z", [1, c] + dims)
        divisors = [d for d in range(1, c + 1) if c % d == 0]
        self.groups = c if broken == "costlier_groups" else int(rng.choice(divisors))
        self.kernel = 3 if broken else int(rng.choice([1, 3, 5]))
        total = self.dilation * (self.kernel - 1)
        begin = int(rng.integers(1 if broken == "off_grid" else 0, total + 1))
        self.pads = (begin, total - begin)
        if broken == "unknown_length":
            self.pads = (1, 0)
        leaves = [self.conv(self.kernel, self.groups, 0)]
        if broken != "costlier_groups":
            leaves += self.random_branches([d for d in divisors if d % self.groups == 0])
        self.outputs = []
        if broken == "off_grid":
            leaves.append(self.conv(3, self.groups, 0, pads=(begin - 1, total - begin + 1)))
        elif broken == "shared_output":
            leaves.append(self.conv(self.kernel, self.groups, 0))
            self.outputs.append(leaves[-1])
        elif broken in ("costlier_groups", "unknown_length"):
            leaves.append(self.conv(1, 1, 0, pads=(0, 0)))
        self.others = [b.conv(self.z, c, c, 1, rank=rank, strides=[self.stride] * rank)
                       for _ in range(int(rng.integers(0, 2)))]
        terms = leaves + self.others
        self.outputs.insert(0, self.sum_tree([terms[i] for i in rng.permutation(len(terms))]))
        self.model = b.model(self.outputs)
        self.input_shapes = {"x": (1, c) + (self.size,) * rank, "z": (1, c) + (self.size,) * rank} \
            if broken == "unknown_length" else None

    def conv(self, k: int, groups: int, offset: int, pads: tuple[int, int] | None = None) -> str:
        d, rank = self.dilation, self.rank
        if pads is None:
            pads = (self.pads[0] - offset * d, self.pads[1] - (self.kernel - k - offset) * d)
        y = self.b.conv(self.x, self.channels, self.channels, k, groups, bias=bool(self.rng.integers(2)),
                        rank=rank, strides=[self.stride] * rank, dilations=[d] * rank,
                        pads=[pads[0]] * rank + [pads[1]] * rank)
        return self.b.bn(y, self.channels) if self.rng.integers(2) else y

    def random_branches(self, group_choices: list[int]) -> list[str]:
        rng, b, leaves = self.rng, self.b, []
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.choice([k for k in (1, 3, 5) if k <= self.kernel]))
            offsets = [o for o in range(self.kernel - k + 1) if self.pads[0] - o * self.dilation >= 0
                       and self.pads[1] - (self.kernel - k - o) * self.dilation >= 0]
            if offsets:
                leaves.append(self.conv(k, int(rng.choice(group_choices)), int(rng.choice(offsets))))
        if self.stride == 1 and self.pads[0] % self.dilation == 0:  # a 1x1 sits on the kernel's grid
            for kind in rng.choice(["x", "bn", "mul", "none"], size=int(rng.integers(0, 3))):
                if kind == "x":
                    leaves.append(self.x)
                elif kind == "bn":
                    leaves.append(b.bn(self.x, self.channels))
                elif kind == "mul":
                    leaves.append(b.node("Mul", [self.x, b.const(b.rand(self.channels, *[1] * self.rank) + 2)]))
        return leaves

    def sum_tree(self, terms: list[str]) -> str:
        while len(terms) > 1:
            op = str(self.rng.choice(["Add", "Sub", "Sum"]))
            take = int(self.rng.integers(2, len(terms) + 1)) if op == "Sum" else 2
            terms = [self.b.node(op, terms[:take])] + terms[take:]
        return terms[0]


def convs_reading_x(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "x")


@pytest.mark.parametrize("seed", range(150))
def test_exact_branch_sets_merge_into_one_conv(seed):
    case = BranchSet(seed)
    optimized, report = rewrite(case.model)
    assert convs_reading_x(optimized) == 1
    assert "BatchNormalization" not in ops(optimized)
    assert ops(optimized)["Conv"] == 1 + len(case.others)
    assert not [r for r in refusals(report) if "'x'" in r]


@pytest.mark.parametrize("broken", sorted(BROKEN))
@pytest.mark.parametrize("seed", range(12))
def test_broken_branch_sets_keep_their_branches_with_the_reason(seed, broken):
    case = BranchSet(seed, broken)
    optimized, report = rewrite(case.model, input_shapes=case.input_shapes)
    assert convs_reading_x(optimized) >= 2
    assert any(BROKEN[broken] in r for r in refusals(report)), refusals(report)
