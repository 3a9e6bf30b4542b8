"""Memory per worker: full fine-tuning (sft_adamw) on 1 Ray Train worker against 2 FSDP2 workers,
the frozen reference model included, measured in one run.

Two figures per rank: ``resident`` is the bytes of parameters, gradients and AdamW state (model
and reference, local shards only) after the first step, deterministic; ``peak`` is the process's
peak memory (RSS on CPU, which includes the Python/torch runtime of a few hundred MiB; allocated
CUDA memory on GPU). Pass ``--gpu`` on a GPU machine.
"""

import argparse
import tempfile
from pathlib import Path

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.config import recipe
from raylens.train import fit_on_ray


def measure(workers: int, use_gpu: bool, world, tmp: Path) -> list[dict]:
    config = recipe("sft_adamw", {"data.num_examples": 64, "batch.epochs": 1,
                                  "batch.per_device_batch": 8, "scaling.num_workers": workers,
                                  "scaling.use_gpu": use_gpu, "scaling.checkpoint_every": 0})
    report = fit_on_ray(config, out=tmp / f"w{workers}", storage_path=tmp / "ray",
                        toyworld=world.root, name=f"w{workers}")
    return report["memory_per_rank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    import ray

    world = tw.load_or_build()
    ray.init(num_cpus=2 if not args.gpu else None, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        one = measure(1, args.gpu, world, Path(tmp))
        two = measure(2, args.gpu, world, Path(tmp))
    ray.shutdown()
    print("workers rank resident_MiB peak_MiB")
    for workers, ranks in ((1, one), (2, two)):
        for rank, m in enumerate(ranks):
            print(f"{workers:7d} {rank:4d} {m['resident_mb']:12.2f} {m['peak_mb']:8.1f}")
    resident = max(m["resident_mb"] for m in two) / one[0]["resident_mb"]
    peak = max(m["peak_mb"] for m in two) / one[0]["peak_mb"]
    print(f"per-worker ratio, 2 FSDP2 workers / 1 worker: resident {resident:.3f}, peak {peak:.3f}")


if __name__ == "__main__":
    main()
