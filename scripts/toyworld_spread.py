"""How much the toy world and the method's acceptance results move between builds.

Builds the toy world for each seed and build thread count (the thread count changes the
reduction order the way another CPU does; each has its own content key), then runs every
acceptance check of ``raylens.acceptance`` on it and prints one markdown row per world: the main
and control baselines, each check's accuracies and its margin to its bound (negative: violated).

    python scripts/toyworld_spread.py --seeds 0 1 2 --threads 1 2 [--cache DIR] [--json F]

About 10-14 minutes per world on 2 cores (build 4-6.5 min, checks ~7.5 min, LoRA 5 of them).
``--json`` is rewritten after every world, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> int:
    """Build the world with several seeds and print each check's margin."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checks", nargs="+", default=None, help="names in raylens.acceptance")
    parser.add_argument("--cache", default=None, help="cache root (default: a new temp folder)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()
    os.environ["RAYLENS_CACHE"] = args.cache or tempfile.mkdtemp(prefix="raylens-spread-")

    import raylens  # noqa: F401  (offline Hugging Face environment first)
    from raylens import toyworld as tw
    from raylens.acceptance import CHECKS, run_check
    from raylens.config import ToyWorldConfig

    names = [c.name for c in CHECKS]
    unknown = sorted(set(args.checks or ()) - set(names))
    if unknown:
        parser.error(f"--checks {unknown} is invalid: allowed {', '.join(names)}")
    checks = [c for c in CHECKS if args.checks is None or c.name in args.checks]
    head = ["seed", "threads", "build s", "main wmdp", "main mmlu", "control wmdp", "control mmlu"]
    head += [f"{c.name} {m}" for c in checks for m in ("wmdp", "mmlu", "margin")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            world = tw.load_or_build(ToyWorldConfig(seed=seed, build_threads=threads),
                                     log=lambda *_: None)
            base = world.baseline
            row = {"seed": seed, "threads": threads, "build_s": base["build_s"],
                   "main": base["main"], "control": base["control"], "checks": {}}
            cells = [seed, threads, base["build_s"], *(f"{base[k][t]:.4f}" for k in
                     ("main", "control") for t in ("toy_wmdp", "toy_mmlu"))]
            for item in checks:
                start = time.perf_counter()
                accs = run_check(item, world.root)
                margin = min(b.margin(accs, base["main"]) for b in item.bounds)
                row["checks"][item.name] = {**accs, "margin": margin,
                                            "s": round(time.perf_counter() - start, 1)}
                cells += [f"{accs['toy_wmdp']:.4f}", f"{accs['toy_mmlu']:.4f}", f"{margin:+.4f}"]
            rows.append(row)
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
