"""One unlearning job with its record: ``raylens unlearn`` is this function behind a parser.

Validate before any compute, score the source model with lm-eval, run (in this process, or as
Ray Train workers when the run has several workers or GPUs; the checkpoints of either resume an
interrupted job), score the export with lm-eval, write ``results.json`` and the MLflow run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from raylens import tracking
from raylens.checkpoint import FolderCheckpoints
from raylens.config import UnlearnConfig, to_flat
from raylens.evaluate import EvalError, hf_lm, run_lm_eval, scoring_device
from raylens.model import load_model
from raylens.ray_train import check_placeable, connect_ray, fit_on_ray
from raylens.train import encoded_questions, run, validate, without_predictions


def _connect(config: UnlearnConfig) -> None:
    """Reach Ray (``ray_train.connect_ray``); refuse workers or GPUs the cluster cannot place,
    naming them, before any compute."""
    connect_ray()
    check_placeable(config.scaling)


def unlearn(config: UnlearnConfig, out: Path, *, toyworld: Path | None = None,
            header: str = "raylens unlearn", log=print) -> dict:
    """Run the job into ``out``; its summary (also ``out/results.json``): lm-eval ``before`` and
    ``after``, the fast scorer's ``in_trial`` scores, ``train_s``, ``num_steps``, ``model`` (the
    export's folder) and ``workers``. A failure is recorded in MLflow with its reason and
    raised."""
    validate(config, toyworld)
    if config.tracking.enabled:
        tracking.check_reachable(tracking.resolve_uri(config.tracking))
    on_ray = config.scaling.num_workers > 1 or config.scaling.use_gpu
    if on_ray:
        _connect(config)
    log(header)
    for key, value in to_flat(config).items():
        log(f"  {key} = {value}")

    def score(model, tokenizer) -> dict:
        lm = hf_lm(model.to(scoring_device()), tokenizer, config.eval.batch_size)
        return run_lm_eval(lm, config.eval.tasks, toyworld=toyworld)

    tracker, run_id = tracking.unlearn_run(config, out) if config.tracking.enabled \
        else (None, "")
    mlflow_run = (tracker.uri, run_id) if tracker else None
    try:
        before = score(*load_model(config.model, toyworld))
        start = time.perf_counter()
        if on_ray:
            # Ray keeps the checkpoints under out/ray/unlearn; the same call again resumes there
            report = fit_on_ray(config, out=out, storage_path=(out / "ray").resolve(),
                                toyworld=toyworld, mlflow_run=mlflow_run,
                                questions=encoded_questions(config, toyworld))
        else:
            store = FolderCheckpoints(out / "checkpoints", keep=config.scaling.keep_checkpoints)
            report = run(config, out, toyworld=toyworld, checkpoints=store, mlflow_run=mlflow_run,
                         log=log)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the export supersedes them
        if report["eval_error"]:
            raise EvalError(report["eval_error"])
        train_s = time.perf_counter() - start
        folder = out / "model"
        after = score(*load_model(replace(config.model, name_or_path=str(folder))))
        summary = {"before": before, "after": after, "in_trial": without_predictions(report["eval"]),
                   "train_s": round(train_s, 1), "num_steps": report["num_steps"],
                   "model": str(folder), "workers": config.scaling.num_workers}
        (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        if tracker:
            tracking.record_unlearn(tracker, run_id, summary, out, config.tracking.max_model_mb)
    except Exception as exc:  # the run is in MLflow either way, with why it stopped
        if tracker:
            tracking.record_failure(tracker, run_id, exc)
        raise
    return summary
