"""Large fuzz budget: seeded random graphs and mutants of the shipped model through optimize, each
checked against onnxruntime (see tests/fuzzing.py for what is checked). Prints the findings and
exits 1 if there is any problem.

    python benchmarks/fuzz.py [--random 800] [--mutants 300] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fuzzing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", type=int, default=800, help="random graphs")
    parser.add_argument("--mutants", type=int, default=300, help="mutants of the shipped model")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    args = parser.parse_args()
    start = time.perf_counter()
    findings = fuzzing.fuzz(args.random, args.mutants, args.seed)
    print(findings.summary())
    for problem in findings.problems:
        print(" ", problem)
    print(f"{time.perf_counter() - start:.0f} s")
    return 1 if findings.problems else 0


if __name__ == "__main__":
    sys.exit(main())
