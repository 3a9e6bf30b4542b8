"""What the short attack suite adds to a toy trial, measured side by side in one process.

A trial of ``raylens demo`` trains the ``sft_adamw`` recipe on the toy world (1,024 document
pairs, 2 epochs, 64 steps). This times that run's training alone (``train.train``; the
in-trial evaluation and the export are not counted, which makes the budget stricter), scores
and exports it as a trial's workers do, then runs the short suite on the export as the same
workers do next (3 attacks: full, LoRA, benign; 12 steps each, evaluated at steps 6 and 12
after a shared step 0), and prints the seconds of each and their ratio.
The suite's time includes loading the model for every attack and every evaluation, so it is
what a trial pays. The issue's budget: at most a quarter of the trial's training time.

    python bench/attack_cost.py [--repeats N]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import raylens  # noqa: F401
from raylens import toyworld as tw
from raylens.attack import run_suite
from raylens.recipes import demo_sweep, suite


def main() -> None:
    """Time a demo trial's training and the short suite on its export; print the ratio."""
    from raylens.evaluate import evaluate_live
    from raylens.train import save_run, train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    world = tw.load_or_build()
    config = demo_sweep().base
    attacks, guard = suite("short")
    rows = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            trial = train(config, toyworld=world.root, log=lambda *_: None)
            trained = time.perf_counter() - start  # training alone: the strict budget
            # the trial's in-trial scoring, as the worker runs it before the attack stage (it
            # loads the questions the attacks score again)
            evaluate_live(trial.model, trial.tokenizer, config.eval, world.root)
            save_run(trial, config, Path(tmp) / "trial")
            start = time.perf_counter()
            result = run_suite(Path(tmp) / "trial" / "model", attacks, Path(tmp) / "attack",
                               data=config.data, eval_config=config.eval,
                               tasks=("toy_wmdp", "toy_mmlu"), scaling=config.scaling,
                               toyworld=world.root, log=lambda *_: None, retain_guard=guard)
            attacked = time.perf_counter() - start
        rows.append((trained, attacked))
        print(f"repeat {repeat + 1}: trial training ({len(trial.history)} steps) "
              f"{trained:.1f} s; short suite {attacked:.1f} s (attack training "
              f"{result['train_s']:.1f} s, evaluation {result['eval_s']:.1f} s); "
              f"suite / trial = {attacked / trained:.3f}; worst {result['worst']:.4f} "
              f"({result['worst_attack']})")
    ratio = sorted(a / t for t, a in rows)[len(rows) // 2]
    print(f"median suite / trial over {len(rows)} repeats: {ratio:.3f} (budget 0.25)")


if __name__ == "__main__":
    main()
