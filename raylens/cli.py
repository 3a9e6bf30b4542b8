"""The ``raylens`` command.

    raylens demo                      the main job on the embedded default (for now: build or load
                                      the toy world and print its baseline table)
    raylens toyworld build [--seed N] build (or load from cache) a toy world, print where and what
    raylens eval --model M [--tasks ...]
                                      score a model folder (or ``toy`` / ``toy-control``) with lm-eval

Bad arguments are reported before any compute, naming the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import raylens  # noqa: F401  (sets the offline Hugging Face environment first)
from raylens.config import EVAL_TASKS, ConfigError, EvalConfig, ToyWorldConfig


def _toy_config(args) -> ToyWorldConfig:
    return ToyWorldConfig(seed=args.seed)


def cmd_toyworld_build(args) -> int:
    from raylens import toyworld as tw

    config = _toy_config(args)
    start = time.perf_counter()
    cached = (tw.world_path(config) / "baseline.json").exists()
    world = tw.load_or_build(config)
    took = time.perf_counter() - start
    print(f"toy world: {world.root}")
    print(f"{'loaded from cache' if cached else 'built'} in {took:.1f} s "
          f"(build took {world.baseline['build_s']} s)")
    print(tw.baseline_table(world))
    return 0


def cmd_demo(args) -> int:
    print("raylens demo: the toy world (hazard = forget domain, general = retain domain)")
    return cmd_toyworld_build(args)


def _model_folder(name: str, world_config: ToyWorldConfig) -> tuple[Path, Path | None]:
    """Resolve ``--model``: ``toy``/``toy-control`` name the toy world's models."""
    from raylens import toyworld as tw

    if name in ("toy", "toy-control"):
        world = tw.load_or_build(world_config)
        return (world.model if name == "toy" else world.control), world.root
    folder = Path(name)
    if not (folder / "config.json").exists():
        raise ConfigError(
            f"--model={name!r} is invalid: allowed 'toy', 'toy-control' or a folder holding a "
            "saved Hugging Face model (config.json)"
        )
    return folder, None


def cmd_eval(args) -> int:
    from raylens.evaluate import evaluate_folder

    eval_config = EvalConfig(tasks=tuple(args.tasks), batch_size=args.batch_size)
    toyworld = Path(args.toyworld) if args.toyworld else None
    if toyworld is not None and not (toyworld / "baseline.json").exists():
        raise ConfigError(f"--toyworld={args.toyworld!r} is invalid: allowed a built toy world folder")
    folder, default_world = _model_folder(args.model, _toy_config(args))
    results = evaluate_folder(folder, eval_config.tasks, toyworld=toyworld or default_world,
                              batch_size=eval_config.batch_size, limit=args.limit)
    if args.json:
        print(json.dumps(results, indent=1, sort_keys=True))
    else:
        print(f"| task | acc | stderr | n |   ({folder})\n|---|---|---|---|")
        for task, r in results.items():
            print(f"| {task} | {r['acc']:.4f} | {r['acc_stderr'] or float('nan'):.4f} | {r['n']} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def seed_option(p):
        p.add_argument("--seed", type=int, default=0, help="toy world seed (default 0)")

    demo = sub.add_parser("demo", help="the main job on the embedded toy world")
    seed_option(demo)
    demo.set_defaults(func=cmd_demo)

    toy = sub.add_parser("toyworld", help="the embedded toy world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_sub.add_parser("build", help="build or load from cache, print the baseline table")
    seed_option(build)
    build.set_defaults(func=cmd_toyworld_build)

    ev = sub.add_parser("eval", help="score a model with lm-eval (0-shot)")
    ev.add_argument("--model", default="toy", help="'toy', 'toy-control' or a model folder")
    ev.add_argument("--tasks", nargs="+", default=["toy_wmdp", "toy_mmlu"],
                    help="tasks from: " + ", ".join(EVAL_TASKS))
    ev.add_argument("--toyworld", default=None, help="toy world folder for the toy tasks")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, default=None, help="first N questions per task (testing)")
    ev.add_argument("--json", action="store_true", help="print results as JSON")
    seed_option(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"raylens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
