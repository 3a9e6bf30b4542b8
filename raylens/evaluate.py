"""Evaluation through lm-eval: results as plain dicts, a missing metric is an error.

Toy tasks (``toy_wmdp``, ``toy_mmlu``) are loaded from the YAMLs in ``raylens/tasks`` without
indexing lm-eval's ~14k built-in tasks; built-in tasks (``wmdp_bio``, ``mmlu``, ``mmlu_stem``) need
their datasets in the local Hugging Face cache. Everything is 0-shot.
"""

from __future__ import annotations

import math
from pathlib import Path

from raylens.config import ConfigError

TASKS_DIR = Path(__file__).parent / "tasks"
TOY_TASKS = ("toy_wmdp", "toy_mmlu")


class EvalError(RuntimeError):
    """An evaluation produced no usable metric; the message names the task."""


def task_manager(tasks: tuple[str, ...], toyworld: Path | None = None):
    """An lm-eval TaskManager that knows raylens's shipped tasks (and the built-ins if asked for)."""
    from lm_eval.tasks import TaskManager

    builtins = any(t not in TOY_TASKS for t in tasks)
    metadata = {"toyworld": str(toyworld)} if toyworld else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=builtins, metadata=metadata)


def run_lm_eval(lm, tasks: tuple[str, ...], *, toyworld: Path | None = None,
                limit: int | None = None) -> dict[str, dict]:
    """Score ``lm`` (an lm-eval ``LM``) on ``tasks``, 0-shot; ``{task: {"acc", "acc_stderr", "n"}}``.

    Global RNG state is left alone (lm-eval would reseed it) so evaluation inside training does
    not change the training run.
    """
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager(tasks, toyworld),
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=None,
            log_samples=False,
            bootstrap_iters=1000,
        )
    except Exception as exc:  # dataset offline/missing, bad task file: name the tasks, keep cause
        raise EvalError(
            f"lm-eval failed on tasks {list(tasks)}: {type(exc).__name__}: {str(exc)[:500]}"
        ) from exc
    return _collect(out, tasks)


def _collect(out: dict | None, tasks: tuple[str, ...]) -> dict[str, dict]:
    results = (out or {}).get("results", {})
    collected = {}
    for task in tasks:
        metrics = results.get(task)
        acc = None if metrics is None else metrics.get("acc,none")
        if acc is None or not isinstance(acc, float) or math.isnan(acc):
            raise EvalError(f"task {task!r} produced no accuracy (got {metrics!r})")
        n = (out.get("n-samples") or {}).get(task, {}).get("effective")
        collected[task] = {"acc": acc, "acc_stderr": metrics.get("acc_stderr,none"), "n": n}
    return collected


def hf_lm(model, tokenizer, batch_size: int = 32):
    """Wrap an in-memory model (plain or PEFT) for lm-eval; puts it in eval mode, since ``HFLM``
    only does so at construction."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_folder(folder: Path, tasks: tuple[str, ...], *, toyworld: Path | None = None,
                    batch_size: int = 32, limit: int | None = None) -> dict[str, dict]:
    """Load a Hugging Face model folder and score it with lm-eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ConfigError(f"model folder {str(folder)!r} has no config.json: not a saved model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return run_lm_eval(hf_lm(model, tokenizer, batch_size), tasks, toyworld=toyworld, limit=limit)
