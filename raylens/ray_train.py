"""One unlearning run as a Ray Train job: ``fit_on_ray`` starts ``scaling.num_workers`` workers
(gloo on CPU, NCCL on GPUs), each of which calls ``train.run`` with Ray's checkpoint store, and
rank 0 exports; Ray restarts a failed worker group from the last checkpoint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from raylens.checkpoint import RayCheckpoints
from raylens.collectives import all_gather, rank_and_world
from raylens.config import UnlearnConfig, from_flat, to_flat
from raylens.evaluate import remember_questions
from raylens.tracking import STEP_METRICS
from raylens.train import run, without_predictions

DRIVER_RESOURCE = "TRAIN_DRIVER"
"""Custom resource a trial's driver holds (one per trial): each node declares how many trials it
hosts at once by how many of these it offers."""


def connect_ray(*, driver_slots: float | None = None) -> None:
    """The one way raylens reaches Ray: join the running cluster (``RAY_ADDRESS``, or the head
    this node belongs to, as ``ray submit`` and ``ray job submit`` leave it); only when there is
    none, start a local instance. ``driver_slots``: a sweep's local instance offers that many
    ``TRAIN_DRIVER`` slots (one per concurrent trial), its dashboard on 127.0.0.1 and no worker
    logs on the console (each trial's log is in its folder)."""
    import ray

    if ray.is_initialized():
        return
    try:  # a cluster's own resources are its nodes' business: never pass any when joining
        ray.init(address="auto")
        return
    except ConnectionError:
        if os.environ.get("RAY_ADDRESS"):
            raise  # the cluster named is not there: starting a local one would hide that
    if driver_slots is None:
        ray.init()
    else:
        ray.init(resources={DRIVER_RESOURCE: driver_slots}, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=False)


def check_placeable(scaling, groups: int = 1) -> None:
    """Refuse, before any compute, ``groups`` worker groups of ``scaling`` the connected
    cluster cannot place at all (Ray would wait for them forever): one GPU, else one CPU, per
    worker. ``ConfigError`` naming the setting, the value and the most the cluster takes."""
    import ray

    from raylens.config import ConfigError

    have = ray.cluster_resources()
    kind = "GPU" if scaling.use_gpu else "CPU"
    fits = int(have.get(kind, 0)) // groups
    if scaling.num_workers > fits:
        flag = "--gpus" if scaling.use_gpu else "--workers"
        raise ConfigError(f"{flag}={scaling.num_workers} is invalid: the Ray cluster has "
                          f"{have.get(kind, 0):g} {kind}s; allowed at most {fits} "
                          f"(scaling.num_workers; one {kind} per worker)")


class RayStepMetrics:
    """Each step's record as Prometheus gauges through ``ray.util.metrics``: Ray exports them
    as ``ray_raylens_<name>`` tagged with ``run`` (the Ray Train run name: the trial id), which
    the Grafana dashboard in ``dashboards/`` plots beside Ray's own metrics."""

    NAMES = ("step", *STEP_METRICS)

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {name: Gauge(f"raylens_{name}", tag_keys=("run",),
                                   description=f"raylens training: {name} of the latest step")
                       for name in self.NAMES}

    def __call__(self, record: dict) -> None:
        """Set every gauge to the record's value (non-finite values are skipped)."""
        for name, gauge in self.gauges.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)


def _ray_worker(loop_config: dict) -> None:
    """One Ray Train worker: ``train.run`` (resuming from Ray's latest checkpoint, if any), with
    each step's metrics as Prometheus gauges and the node each rank ran on in the report; Ray's
    result store gets the report without per-question predictions (they stay in the file)."""
    import ray.train
    import ray.util

    config = from_flat(UnlearnConfig, loop_config["config"])
    toyworld = Path(loop_config["toyworld"]) if loop_config["toyworld"] else None
    if loop_config.get("questions") is not None:  # encoded by the driver: no task loading here
        remember_questions(ray.get(loop_config["questions"]))
    rank, _ = rank_and_world()
    nodes = all_gather(ray.util.get_node_ip_address())  # where each rank ran
    report = run(config, Path(loop_config["out"]), toyworld=toyworld,
                 log=print if rank == 0 else (lambda *_: None), checkpoints=RayCheckpoints(),
                 on_step=RayStepMetrics(loop_config["name"]) if rank == 0 else None,
                 mlflow_run=tuple(loop_config["mlflow"]) if loop_config.get("mlflow") else None,
                 evaluate=loop_config.get("evaluate", True), extra={"node_per_rank": nodes})
    if loop_config.get("attack") and not report["eval_error"] and not report["diverged"]:
        _attack_export(loop_config, config, toyworld, rank)
    ray.train.report({**report, "eval": without_predictions(report["eval"])})


def _attack_export(loop_config: dict, config: UnlearnConfig, toyworld: Path | None,
                   rank: int) -> None:
    """A trial's attack stage on the workers that trained it: the suite on the export
    (``out/model``) into ``out/attack`` (its questions already loaded by the trial's scoring)."""
    from raylens.attack import run_suite
    from raylens.config import AttackConfig

    spec, out = loop_config["attack"], Path(loop_config["out"])
    all_gather(rank)  # rank 0 has written the export before any rank reads it
    run_suite(out / "model", [from_flat(AttackConfig, a) for a in spec["attacks"]],
              out / "attack", data=config.data, eval_config=config.eval,
              tasks=tuple(spec["tasks"]), scaling=config.scaling, toyworld=toyworld,
              log=print if rank == 0 else (lambda *_: None), retain_guard=spec["retain_guard"])


def _fit(worker, loop_config: dict, scaling, *, name: str, storage_path: Path) -> None:
    """Run ``worker(loop_config)`` on ``scaling.num_workers`` Ray Train workers (gloo on CPU,
    NCCL on GPUs), restarting a failed group up to ``scaling.max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=RayScalingConfig(num_workers=scaling.num_workers,
                                        use_gpu=scaling.use_gpu),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )
    trainer.fit()  # raises ray.train.TrainingFailedError with the worker's traceback


def fit_on_ray(config: UnlearnConfig, *, out: Path, storage_path: Path,
               toyworld: Path | None = None, name: str = "unlearn",
               evaluate: bool = True, mlflow_run: tuple[str, str] | None = None,
               attack: dict | None = None, questions=None) -> dict:
    """Run ``train`` as ``scaling.num_workers`` Ray Train workers (gloo on CPU, NCCL on GPUs);
    rank 0 exports to ``out`` with ``history.jsonl`` and ``train_report.json`` (the last step's
    metrics, every rank's parameter digest and memory, the step it resumed from, and with
    ``evaluate`` the fast scorer's results on the live model or the error that stopped it),
    which this returns. Checkpoints go to ``storage_path/name``: a failed worker group is
    restarted from the last one up to ``scaling.max_failures`` times, and a new call with the
    same ``name`` and ``storage_path`` continues an interrupted run. ``mlflow_run``:
    ``(tracking uri, run id)`` that rank 0 logs each step's metrics to; every run exports them
    to Ray's Prometheus metrics. ``attack``: ``{"attacks": [flat AttackConfig], "tasks":
    [forget, retain], "retain_guard"}``, a suite the same workers run on the export afterwards
    (``out/attack/suite.json``; a restarted group skips the attacks already written).
    ``questions``: the evaluation questions the driver encoded (``train.encoded_questions``),
    which the workers take instead of loading the tasks again."""
    import ray

    if questions is not None:
        questions = ray.put(questions)  # one copy in the object store, not one per worker
    _fit(_ray_worker, {"config": to_flat(config), "out": str(out), "evaluate": evaluate,
                       "toyworld": str(toyworld) if toyworld else None, "name": name,
                       "mlflow": list(mlflow_run) if mlflow_run else None, "attack": attack,
                       "questions": questions},
         config.scaling, name=name, storage_path=storage_path)
    return json.loads((Path(out) / "train_report.json").read_text())


def _ray_attack_worker(loop_config: dict) -> None:
    """One Ray Train worker of an attack suite: ``attack.run_suite`` on every rank."""
    from raylens.attack import run_suite
    from raylens.config import AttackConfig, DataConfig, EvalConfig, ScalingConfig

    rank, _ = rank_and_world()
    toyworld = Path(loop_config["toyworld"]) if loop_config["toyworld"] else None
    run_suite(loop_config["model_dir"],
              [from_flat(AttackConfig, a) for a in loop_config["attacks"]], loop_config["out"],
              data=from_flat(DataConfig, loop_config["data"]),
              eval_config=from_flat(EvalConfig, loop_config["eval"]),
              tasks=tuple(loop_config["tasks"]),
              scaling=from_flat(ScalingConfig, loop_config["scaling"]), toyworld=toyworld,
              log=print if rank == 0 else (lambda *_: None),
              retain_guard=loop_config["retain_guard"])


def run_attacks(model_dir: Path, attacks: list, out: Path, *, data, eval_config,
                tasks: tuple[str, str], scaling, on_ray: bool, toyworld: Path | None = None,
                retain_guard: float | None = None) -> dict:
    """An attack suite in this process (``attack.run_suite``), or with ``on_ray`` as Ray
    Train workers (``attack_on_ray``, Ray connected; its storage under ``out/ray``)."""
    if not on_ray:
        from raylens.attack import run_suite

        return run_suite(model_dir, attacks, out, data=data, eval_config=eval_config,
                         tasks=tasks, scaling=scaling, toyworld=toyworld,
                         retain_guard=retain_guard)
    return attack_on_ray(model_dir, attacks, out, data=data, eval_config=eval_config,
                         tasks=tasks, scaling=scaling, storage_path=(Path(out) / "ray").resolve(),
                         name="attack", toyworld=toyworld, retain_guard=retain_guard)


def attack_on_ray(model_dir: Path, attacks: list, out: Path, *, data, eval_config,
                  tasks: tuple[str, str], scaling, storage_path: Path, name: str,
                  toyworld: Path | None = None, retain_guard: float | None = None) -> dict:
    """``attack.run_suite`` as ``scaling.num_workers`` Ray Train workers (DDP for LoRA
    attackers, FSDP2 for full ones); returns the suite's result (``out/suite.json``). A
    restarted worker group skips the attacks already written to ``out``."""
    _fit(_ray_attack_worker, {
        "model_dir": str(model_dir), "attacks": [to_flat(a) for a in attacks], "out": str(out),
        "data": to_flat(data), "eval": to_flat(eval_config), "tasks": list(tasks),
        "scaling": to_flat(scaling), "toyworld": str(toyworld) if toyworld else None,
        "retain_guard": retain_guard}, scaling, name=name, storage_path=storage_path)
    return json.loads((Path(out) / "suite.json").read_text())
