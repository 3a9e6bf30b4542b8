"""1 against 2 Ray Train workers on the CPU: step throughput and memory per rank, LoRA under
DDP and full fine-tuning under FSDP2, on the toy world, in one run.

Each configuration trains the same 16 steps (global batch 16, per-device batch 8, so one
process takes 2 micro-batches a step and each of 2 ranks 1); the throughput is the median over
steps 4-16 of a step's global tokens per second of its wall time (``history.jsonl``), so worker
start-up and the first steps' allocations are left out. Each configuration runs ``--repeats`` times, the
four in turn, and the 2-worker / 1-worker ratio is printed with its spread (min-max). On this
2-core machine 2 workers get one core each where 1 worker has two: the ideal ratio is 1.0 for
throughput, and the gloo all-reduce (DDP) or all-gathers and reduce-scatters (FSDP2) are the overhead
above it. ``resident`` is a rank's parameters, gradients, optimizer state and reference after
the first step (deterministic); ``peak`` its process's peak RSS.

    python bench/scaling.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.ray_train import fit_on_ray
from raylens.recipes import recipe

CASES = {"lora_adamw": "DDP", "sft_adamw": "FSDP2"}


def measure(name: str, workers: int, world, tmp: Path, tag: str) -> dict:
    """One run of ``name`` on ``workers`` workers: the median throughput, memory per rank."""
    config = recipe(name, {"data.num_examples": 256, "batch.global_batch": 16,
                           "batch.per_device_batch": 8, "scaling.num_workers": workers,
                           "scaling.checkpoint_every": 0})
    out = tmp / f"{name}-{workers}-{tag}"
    report = fit_on_ray(config, out=out, storage_path=tmp / "ray", toyworld=world.root,
                        name=out.name, evaluate=False)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in history[3:]),
            "memory": report["memory_per_rank"]}


def main() -> None:
    """Every case on 1 and 2 workers, in turn, ``--repeats`` times; prints the table."""
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    world = tw.load_or_build()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in CASES:
                for workers in (1, 2):
                    runs.setdefault((name, workers), []).append(
                        measure(name, workers, world, Path(tmp), str(r)))
    ray.shutdown()
    print("recipe      plan   workers  tokens/s (median of runs)  resident MiB/rank  "
          "peak MiB/rank")
    figures = {}
    for (name, workers), found in runs.items():
        tps = statistics.median(f["tokens_per_s"] for f in found)
        resident = max(m["resident_mb"] for f in found for m in f["memory"])
        peak = max(m["peak_mb"] for f in found for m in f["memory"])
        print(f"{name:11s} {CASES[name]:6s} {workers:7d}  {tps:25.0f}  {resident:17.1f}  "
              f"{peak:13.1f}")
        figures[f"{name}/{workers}"] = {"tokens_per_s": [f["tokens_per_s"] for f in found],
                                        "resident_mb": resident, "peak_mb": peak}
    for name in CASES:
        ratios = [b["tokens_per_s"] / a["tokens_per_s"]
                  for a, b in zip(runs[name, 1], runs[name, 2])]
        print(f"{name} ({CASES[name]}): throughput 2 workers / 1 worker "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
