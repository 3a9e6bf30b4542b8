"""The raylens command: real subprocesses, from a directory unrelated to the repository."""

import json
import os
import subprocess
import sys

import pytest


def raylens(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return subprocess.run([sys.executable, "-m", "raylens.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_from_any_directory_reproduces_the_baseline(world, tmp_path):
    # raylens sets the offline environment itself: the HF_* variables were removed above
    out = raylens("eval", "--model", str(world.control), "--toyworld", str(world.root), "--json",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout[out.stdout.index("{"):])
    assert results["toy_wmdp"]["acc"] == world.baseline["control"]["toy_wmdp"]
    assert results["toy_mmlu"]["acc"] == world.baseline["control"]["toy_mmlu"]
    assert results["toy_wmdp"]["n"] == 4 * world.config.num_entities


def test_demo_prints_the_baseline_table(world, tmp_path):
    out = raylens("demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded from cache" in out.stdout
    main = world.baseline["main"]
    assert f"| main (both corpora) | {main['toy_wmdp']:.4f} | {main['toy_mmlu']:.4f} |" in out.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["eval", "--tasks", "toy_wmdp", "hellaswag"], "eval.tasks"),
        (["eval", "--batch-size", "0"], "eval.batch_size"),
        (["eval", "--model", "/nonexistent/model"], "--model"),
        (["eval", "--toyworld", "/nonexistent"], "--toyworld"),
    ],
)
def test_bad_arguments_fail_fast_naming_the_field(args, field, tmp_path):
    out = raylens(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert field in out.stderr and "allowed" in out.stderr
    assert "Traceback" not in out.stderr
