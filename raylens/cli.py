"""The ``raylens`` command.

    raylens demo [--name N]           the main job: the toy world's baseline, then a sweep (Ray
                                      Tune + Optuna over Ray Train trials) and its Pareto front
    raylens toyworld build [--seed N] build (or load from cache) a toy world, print where and what
    raylens eval --model M [--tasks ...] [--scorer fast [--subset F]]
                                      score a model folder (or ``toy`` / ``toy-control``) with
                                      lm-eval, or with the fast one-forward scorer
    raylens unlearn --recipe R [--set key=value ...] [--workers N | --gpus N] --out DIR [--resume]
                                      one unlearning run: eval before, train, export, eval after;
                                      --resume continues an interrupted run from its checkpoint
    raylens attack MODEL_DIR [--suite seed|short|long] [--examples N --lr X --eval-every K ...]
                                      fine-tuning attacks on an unlearned model: the tamper table
    raylens finalize SWEEP [--suite long]
                                      the finalists re-scored on every question, attacked, the
                                      final front
    raylens report EXPERIMENT [--format md|csv|json]
                                      a sweep's table in the seed runs' shape, from MLflow alone
    raylens ui [--port P]             the MLflow UI of the local store on 127.0.0.1

Bad arguments are reported before any compute, naming the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import raylens  # noqa: F401  (sets the offline Hugging Face environment first)
from raylens.config import EVAL_TASKS, ConfigError, EvalConfig, ToyWorldConfig, parse_overrides


def _toy_config(args) -> ToyWorldConfig:
    from raylens import toyworld as tw

    config = tw.default_config()
    return config if args.seed is None else replace(config, seed=args.seed)


def cmd_toyworld_build(args) -> int:
    """``raylens toyworld build``: build (or load) the toy world, print its baselines."""
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
    """The main job: the toy world's baseline, then a sweep (Ray Tune + Optuna, each trial a Ray
    Train run with in-trial evaluation) and its Pareto front."""
    import ray

    from raylens import toyworld as tw
    from raylens.recipes import demo_sweep
    from raylens.search import compare_to_base, connect_or_start, front_table, run_sweep

    storage = args.storage or os.environ.get("RAYLENS_STORAGE", "raylens-runs")
    name = args.name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    from raylens.config import replace_sweep, split_overrides

    own, base = split_overrides(parse_overrides(args.set))
    sweep = replace_sweep(demo_sweep(storage=storage, name=name, num_trials=args.trials,
                                     overrides=base), own)  # validated first
    print("raylens demo: the toy world (hazard = forget domain, general = retain domain)")
    cmd_toyworld_build(args)
    goals = {"forget_acc": f"{sweep.forget_task} (min)", "retain_acc": f"{sweep.retain_task} (max)",
             "attack_acc": f"{sweep.forget_task} after the {sweep.attack_suite} attacks (min)"}
    print(f"\nsweep {name}: {sweep.num_trials} trials of the sft_adamw recipe, searching "
          f"{', '.join(sweep.space)} against {', '.join(goals[k] for k in sweep.objectives)}"
          f" -> {Path(storage) / name}")
    connect_or_start(sweep)
    start = time.perf_counter()
    rows = run_sweep(sweep, toyworld=tw.load_or_build(_toy_config(args)).root)
    ray.shutdown()
    finished = sum(r["forget_acc"] is not None for r in rows)
    print(f"\n{finished} of {len(rows)} trials finished in {time.perf_counter() - start:.0f} s; "
          "* = Pareto front (feasible, undominated)")
    print(front_table(rows, sweep))
    print(compare_to_base(rows, sweep))
    if sweep.base.tracking.enabled:
        from raylens.tracking import resolve_uri

        print(f"MLflow ({resolve_uri(sweep.base.tracking)}), experiment {name}: "
              f"`raylens ui` to browse it, `raylens report {name}` for the table; the Pareto "
              f"plot is on run {name} under pareto/")
    print(f"rerun with --name {name} to resume this sweep")
    return 0 if any(r["pareto"] for r in rows) else 1


def _sweep(sweep, toyworld: Path | None) -> int:
    """Preflight, run and print a sweep file's sweep: the trial table with the Pareto front
    marked and the base point's comparison; exit 0 when the front is not empty."""
    import ray

    from raylens.preflight import preflight
    from raylens.search import compare_to_base, connect_or_start, front_table, run_sweep

    _quiet_libraries()
    for line in preflight(sweep.base, toyworld):
        print(f"preflight: {line}")
    connect_or_start(sweep)
    rows = run_sweep(sweep, toyworld=toyworld, checked=True)
    print(front_table(rows, sweep))
    print(compare_to_base(rows, sweep))
    ray.shutdown()
    return 0 if any(r["pareto"] for r in rows) else 1


def cmd_sweep(args) -> int:
    """``raylens sweep FILE``: what ``python FILE`` does, for a sweep file anywhere."""
    from raylens.sweepfile import load_sweep_file, sweep_from_options

    return _sweep(*sweep_from_options(*load_sweep_file(args.sweep_file), args))


def sweep_main(real, toy, argv: list[str] | None = None) -> int:
    """Entry point of a ``sweeps/*.py`` file: the real sweep on the cluster this runs on
    (``ray submit cluster.yaml sweeps/x.py`` or ``ray job submit``), or its toy-world version
    with ``--toy``. Bad input is one line naming the field, exit 2, before any compute."""
    from raylens.sweepfile import add_sweep_options, sweep_from_options

    parser = OneLineParser(description=f"sweep {real.name}")
    add_sweep_options(parser)
    args = parser.parse_args(argv)
    try:
        return _sweep(*sweep_from_options(real, toy, args))
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


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
    """``raylens eval``: score a model folder or the toy models with lm-eval or the fast scorer."""
    from raylens.evaluate import evaluate_folder

    eval_config = EvalConfig(tasks=tuple(args.tasks), batch_size=args.batch_size,
                             time_limit_s=args.time_limit, subset=args.subset,
                             data_dir=args.data_dir)
    toyworld = Path(args.toyworld) if args.toyworld else None
    if toyworld is not None and not (toyworld / "baseline.json").exists():
        raise ConfigError(f"--toyworld={args.toyworld!r} is invalid: allowed a built toy world folder")
    if args.scorer == "lm-eval" and args.subset is not None:
        raise ConfigError(f"--subset={args.subset} is invalid with --scorer lm-eval: allowed "
                          "with --scorer fast (lm-eval scores whole tasks, or --limit N)")
    folder, default_world = _model_folder(args.model, _toy_config(args))
    toyworld = toyworld or default_world
    if args.scorer == "fast":
        from raylens.evaluate import score_folder

        results = score_folder(folder, eval_config, toyworld)
    else:
        results = evaluate_folder(folder, eval_config.tasks, toyworld=toyworld,
                                  batch_size=eval_config.batch_size, limit=args.limit,
                                  data_dir=args.data_dir, time_limit_s=args.time_limit)
    if args.json:
        print(json.dumps(results, indent=1, sort_keys=True))
    else:
        from raylens.report import markdown_table

        print(f"{folder}:")
        print(markdown_table(["task", "acc", "stderr", "n"], [
            [task, f"{r['acc']:.4f}", f"{r['acc_stderr'] or float('nan'):.4f}", r["n"]]
            for task, r in results.items()]))
    return 0


def _results_table(before: dict, after: dict, in_trial: dict) -> str:
    from raylens.report import markdown_table

    return markdown_table(
        ["task", "before", "after", "change", "in-trial (fast scorer)"],
        [[task, f"{before[task]['acc']:.4f}", f"{after[task]['acc']:.4f}",
          f"{after[task]['acc'] - before[task]['acc']:+.4f}", f"{in_trial[task]['acc']:.4f}"]
         for task in after])


def _workers_or_gpus(args) -> tuple[int, bool] | None:
    """``--workers N`` or ``--gpus N`` as ``(workers, with GPUs)``; None when neither is given.
    Both at once is refused."""
    if args.workers is not None and args.gpus is not None:
        raise ConfigError(f"--gpus={args.gpus} is invalid with --workers={args.workers}: allowed "
                          "one of them (--gpus N runs N workers with one GPU each)")
    if args.gpus is not None:
        return args.gpus, True
    return None if args.workers is None else (args.workers, False)


def cmd_unlearn(args) -> int:
    """``raylens unlearn``: one run of a recipe (``unlearn.unlearn``), its before/after table."""
    from raylens import toyworld as tw
    from raylens.config import uses_toyworld
    from raylens.recipes import recipe
    from raylens.unlearn import unlearn

    overrides: dict[str, object] = dict(parse_overrides(args.set))
    chosen = _workers_or_gpus(args)
    if chosen is not None:
        overrides["scaling.num_workers"] = chosen[0]
        if chosen[1]:
            overrides["scaling.use_gpu"] = True
    config = recipe(args.recipe, overrides)
    out = Path(args.out)
    if args.resume:
        if (out / "results.json").exists():
            raise ConfigError(f"--out={args.out!r} is invalid with --resume: it holds a finished "
                              "run (results.json); allowed the folder of an interrupted run")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out={args.out!r} is invalid: allowed a new or empty folder "
                          "(or --resume to continue the interrupted run in it)")
    toyworld = tw.load_or_build(_toy_config(args)).root if uses_toyworld(config) else None
    summary = unlearn(config, out, toyworld=toyworld, header=f"raylens unlearn: recipe {args.recipe}")
    print(f"trained {summary['num_steps']} steps on {config.scaling.num_workers} worker(s) in "
          f"{summary['train_s']:.1f} s; model exported to {summary['model']}")
    print(_results_table(summary["before"], summary["after"], summary["in_trial"]))
    return 0


def _attacked(name: str, world_config: ToyWorldConfig):
    """``(model folder, the run config it came from, toy world)`` for ``raylens attack``: the
    toy models, a run's output folder (``model/`` beside raylens's ``config.json``), its model
    folder, or any model folder (then the toy world's corpora and tasks, as defaults are)."""
    from raylens import toyworld as tw
    from raylens.config import UnlearnConfig, from_flat, uses_toyworld

    if name in ("toy", "toy-control"):
        folder, _ = _model_folder(name, world_config)
        base = UnlearnConfig()
    else:
        path = Path(name)
        run_dir = path if (path / "model" / "config.json").exists() else path.parent
        folder = path / "model" if run_dir == path else path
        if not (folder / "config.json").exists():
            raise ConfigError(f"MODEL_DIR={name!r} is invalid: allowed 'toy', 'toy-control', a "
                              "run's output folder or a saved Hugging Face model folder")
        saved = run_dir / "config.json"
        flat = json.loads(saved.read_text()) if saved.exists() else {}
        base = (from_flat(UnlearnConfig, flat) if "model.name_or_path" in flat
                else UnlearnConfig())
    toyworld = tw.load_or_build(world_config).root if uses_toyworld(base) else None
    return folder, base, toyworld


_ATTACK_FLAGS = {"name": "name", "examples": "num_examples", "corpus": "corpus",
                 "mode": "mode", "lr": "lr", "schedule": "schedule", "warmup": "warmup_ratio",
                 "epochs": "epochs", "steps": "max_steps", "batch": "global_batch",
                 "per_device_batch": "per_device_batch", "dtype": "dtype",
                 "eval_every": "eval_every", "level": "level", "max_length": "max_length",
                 "weight_decay": "weight_decay"}
"""``raylens attack`` options and the ``AttackConfig`` field each sets."""


def cmd_attack(args) -> int:
    """``raylens attack MODEL_DIR``: a suite of fine-tuning attacks (or the seed's one attack
    with the options' changes) on a model; the tamper table, files and an MLflow run."""
    import dataclasses

    from raylens.config import ScalingConfig
    from raylens.recipes import suite
    from raylens.report import tamper_table

    folder, base, toyworld = _attacked(args.model_dir, _toy_config(args))
    changes = {field: getattr(args, flag) for flag, field in _ATTACK_FLAGS.items()
               if getattr(args, flag) is not None}
    attacks, guard = suite(args.suite, real=toyworld is None)
    if len(attacks) > 1 and "name" in changes:
        raise ConfigError(f"--name={changes['name']!r} is invalid with --suite {args.suite}: "
                          "allowed with a one-attack suite (seed)")
    attacks = [dataclasses.replace(a, **changes) for a in attacks]  # validated again
    tasks = (args.forget_task or base.eval.tasks[0], args.retain_task or base.eval.tasks[-1])
    eval_config = dataclasses.replace(base.eval, tasks=tasks, subset=args.subset)
    workers, gpus = _workers_or_gpus(args) or (1, False)
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpus, checkpoint_every=0)
    out = Path(args.out or f"raylens-attacks/{folder.parent.name}-{args.suite}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise ConfigError(f"--out={str(out)!r} is invalid: allowed a new or empty folder (or "
                          "--resume to finish the suite written there)")
    from raylens.attack import check

    check(attacks, folder, data=base.data, eval_config=eval_config, scaling=scaling,
          toyworld=toyworld)  # before any compute (and before Ray starts)
    print(f"raylens attack: suite {args.suite} ({len(attacks)} attack(s)) on {folder} -> {out}")
    from raylens.ray_train import check_placeable, connect_ray, run_attacks

    on_ray = _workers_or_gpus(args) is not None
    if on_ray:
        connect_ray()
        check_placeable(scaling)
    result = run_attacks(folder, attacks, out, data=base.data, eval_config=eval_config,
                         tasks=tasks, scaling=scaling, on_ray=on_ray, toyworld=toyworld,
                         retain_guard=guard)
    if on_ray:
        import ray

        ray.shutdown()
    print(tamper_table([{"label": str(folder), "results": result["results"],
                         "worst_attack": result["worst_attack"]}], tasks[1]))
    print(f"worst case: {tasks[0]} {result['worst']:.4f} after attack {result['worst_attack']} "
          f"(recovery {result['recovery']:+.4f}); {result['train_s']:.1f} s training, "
          f"{result['eval_s']:.1f} s evaluation; results in {out}")
    if base.tracking.enabled and not args.no_track:
        from mlflow.tracking import MlflowClient

        from raylens.tracking import attack_run, record_attack

        uri, run_id = attack_run(base.tracking, folder, args.suite)
        client = MlflowClient(uri)
        record_attack(client, run_id, result, args.suite)
        client.set_tag(run_id, "status", "ok")
        client.set_terminated(run_id, "FINISHED")
        print(f"MLflow ({uri}), experiment {base.tracking.experiment}: run {run_id}; "
              f"`raylens report {base.tracking.experiment}` for the tamper table")
    return 0


def _tracking_uri(uri: str | None) -> str:
    from raylens.config import TrackingConfig
    from raylens.tracking import resolve_uri

    return resolve_uri(TrackingConfig(tracking_uri=uri))


def cmd_report(args) -> int:
    """A sweep's table, in the seed runs' shape, from MLflow alone."""
    from mlflow.tracking import MlflowClient

    from raylens.tracking import report

    uri = _tracking_uri(args.uri)
    try:
        text = report(MlflowClient(uri), args.experiment, args.format)
    except ValueError as exc:
        print(f"raylens: error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_finalize(args) -> int:
    """``raylens finalize SWEEP``: the finalists re-scored on every question and attacked with
    a suite (``finalize.finalize``); their table, the runs updated in MLflow."""
    from mlflow.tracking import MlflowClient

    from raylens import toyworld as tw
    from raylens.config import ScalingConfig
    from raylens.finalize import final_table, finalize
    from raylens.recipes import suite
    from raylens.tracking import objectives_of, trial_rows

    suite(args.suite)  # a bad name is refused before anything runs
    chosen = _workers_or_gpus(args)
    client = MlflowClient(_tracking_uri(args.uri))
    try:
        parent, _ = trial_rows(client, args.experiment)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    toy = json.loads(parent["params"].get("eval_tasks", "[]"))[0].startswith("toy_")
    scaling = None
    if chosen is not None:
        from raylens.ray_train import check_placeable, connect_ray

        connect_ray()
        scaling = ScalingConfig(num_workers=chosen[0], use_gpu=chosen[1], checkpoint_every=0)
        check_placeable(scaling)
    rows = finalize(client, args.experiment, suite_name=args.suite, scaling=scaling,
                    toyworld=tw.load_or_build(_toy_config(args)).root if toy else None)
    tasks = {"forget": parent["tags"]["forget_task"], "retain": parent["tags"]["retain_task"]}
    print(final_table(rows, objectives_of(parent), tasks))
    print(f"MLflow: each finalist's run has final/<task> and final/attack/...; the final front "
          f"is tagged final_pareto and plotted on run {args.experiment} under final/")
    return 0


def cmd_ui(args) -> int:
    """The MLflow UI on 127.0.0.1 over the local store (a server's URI is already the UI)."""
    import subprocess

    from raylens.tracking import sqlite_path

    uri = _tracking_uri(args.uri)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is an MLflow server: open it in a browser (on a cluster, through the SSH "
              "tunnel cluster.yaml describes)")
        return 0
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        print(f"raylens: error: no MLflow store at {uri}: run a sweep here first or pass --uri",
              file=sys.stderr)
        return 2
    print(f"MLflow UI of {uri} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def cmd_rehearsal_build(args) -> int:
    """``raylens rehearsal build``: the offline cache of stand-ins for the real hub ids."""
    from raylens import rehearsal
    from raylens import toyworld as tw

    folder = Path(args.folder).resolve()
    rehearsal.build(folder, world=tw.load_or_build(_toy_config(args)))
    print(f"rehearsal cache written to {folder}; run the real sweeps on it with\n"
          f"  HF_HOME={folder} python sweeps/lora_adamw.py --set scaling.use_gpu=false ...")
    return 0


def cmd_preflight(args) -> int:
    """Check (or, for prefetch, first download) every asset a sweep file's base config names."""
    from raylens import preflight
    from raylens.sweepfile import load_sweep_file, sweep_from_options

    online = args.command == "prefetch"
    if online and os.environ.get("RAYLENS_ONLINE") != "1":
        # raylens made the Hugging Face stack offline at import: start again online
        env = {k: v for k, v in os.environ.items() if k not in raylens.OFFLINE_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "raylens.cli", *sys.argv[1:]],
                  {**env, "RAYLENS_ONLINE": "1"})
    sweep, toyworld = sweep_from_options(*load_sweep_file(args.sweep_file), args)
    check = preflight.prefetch if online else preflight.preflight
    for line in check(sweep.base, toyworld):
        print(f"{args.command}: {line}")
    print(f"{args.command}: sweep {sweep.name} can run offline here")
    return 0


def cmd_cluster(args) -> int:
    """``raylens cluster ...``: the node commands ``cluster.yaml`` runs."""
    from raylens import cluster

    if args.cluster_command == "secrets":
        path = cluster.make_secrets(Path(args.path).expanduser())
        print(f"wrote {path} (owner-only): cluster.yaml ships it to every node")
        return 0
    node = cluster.Node.here()
    if args.cluster_command == "setup-node":
        path = cluster.setup_node(node)
        print(f"node {node.node_ip} (head {node.head_ip}) ready; environment in {path}")
    elif args.cluster_command == "start-services":
        pids = cluster.start_services(node)
        print(f"MLflow at http://{node.node_ip}:{cluster.MLFLOW_PORT} (pid {pids['mlflow']}), "
              f"Optuna dashboard at http://127.0.0.1:{cluster.DASHBOARD_PORT} "
              f"(pid {pids['optuna-dashboard']}), PostgreSQL on 127.0.0.1:{node.db_port}")
    else:
        print("stopped: " + (", ".join(cluster.stop_services(node)) or "nothing was running"))
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the option, the value, what is allowed),
    exit status 2, like every other refusal; ``--help`` still prints the usage."""

    def error(self, message: str):
        """Print ``prog: error: message`` on one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None,
                   help="toy world seed (default 0, or the seed in $RAYLENS_TOYWORLD)")


def _set_option(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, e.g. --set {example} (repeatable)")


def _add_run_commands(sub) -> None:
    """``demo``, ``unlearn`` and ``eval``: the commands that train or score."""
    demo = sub.add_parser("demo", help="the main job: a toy-world sweep and its Pareto front")
    demo.add_argument("--name", default=None,
                      help="sweep name (default demo-<time>); an existing name resumes it")
    demo.add_argument("--storage", default=None,
                      help="storage root (default $RAYLENS_STORAGE or raylens-runs)")
    demo.add_argument("--trials", type=int, default=12, help="trial budget (default 12)")
    _set_option(demo, "data.num_examples=256 or sweep.attack_suite=short")
    _seed_option(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="score a model with lm-eval (0-shot)")
    ev.add_argument("--model", default="toy", help="'toy', 'toy-control' or a model folder")
    ev.add_argument("--tasks", nargs="+", default=["toy_wmdp", "toy_mmlu"],
                    help="tasks from: " + ", ".join(EVAL_TASKS))
    ev.add_argument("--toyworld", default=None, help="toy world folder for the toy tasks")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, default=None, help="first N questions per task (testing)")
    ev.add_argument("--scorer", choices=("lm-eval", "fast"), default="lm-eval",
                    help="lm-eval (the authority, default) or raylens's one-forward scorer")
    ev.add_argument("--subset", type=float, default=None,
                    help="fast scorer: a seeded, stratified fraction of each task")
    ev.add_argument("--data-dir", default=None,
                    help="local dataset snapshots, <dir>/<hub id> (offline clusters)")
    ev.add_argument("--time-limit", type=float, default=1800.0,
                    help="seconds before the evaluation fails (default 1800)")
    ev.add_argument("--json", action="store_true", help="print results as JSON")
    _seed_option(ev)
    ev.set_defaults(func=cmd_eval)

    un = sub.add_parser("unlearn", help="one unlearning run with eval before and after")
    un.add_argument("--recipe", required=True, help="lora_adamw, sft_adamw or sft_muon")
    _set_option(un, "loss.retain_coef=5")
    un.add_argument("--out", required=True, help="new folder for the model, config and results")
    un.add_argument("--workers", type=int, default=None,
                    help="Ray Train workers on CPU: LoRA under DDP, full fine-tuning under FSDP2")
    un.add_argument("--gpus", type=int, default=None,
                    help="Ray Train workers with one GPU each (NCCL) on the Ray cluster")
    un.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --out from its last checkpoint")
    _seed_option(un)
    un.set_defaults(func=cmd_unlearn)
    _add_attack_command(sub)


def _add_attack_command(sub) -> None:
    """``attack``: fine-tuning attacks on an unlearned model."""
    at = sub.add_parser("attack", help="fine-tuning attacks on an unlearned model (tamper test)")
    at.add_argument("model_dir", help="a run's output folder, a model folder, 'toy' or "
                    "'toy-control'")
    at.add_argument("--suite", default="seed", help="seed (default: the seed's attack), short "
                    "(every trial), long (finalists)")
    number = {"examples": (int, "documents the attacker trains on"),
              "lr": (float, "peak learning rate"), "warmup": (float, "warmup fraction"),
              "epochs": (int, "passes over the documents"), "steps": (int, "stop after N steps"),
              "batch": (int, "documents per optimizer step"),
              "per_device_batch": (int, "documents per forward pass"),
              "eval_every": (int, "steps between evaluations"),
              "level": (float, "forget accuracy counted as recovered"),
              "max_length": (int, "tokens per document"),
              "weight_decay": (float, "decoupled weight decay")}
    for flag, (kind, text) in number.items():
        at.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None,
                        help=text + " (default: the suite's)")
    for flag, choices in (("corpus", ("forget", "retain")), ("mode", ("full", "lora")),
                          ("schedule", ("linear", "cosine", "constant")),
                          ("dtype", ("float32", "bfloat16", "float16"))):
        at.add_argument(f"--{flag}", choices=choices, default=None)
    at.add_argument("--name", default=None, help="label of a one-attack suite's attack")
    at.add_argument("--forget-task", default=None, help="default: the run's first eval task")
    at.add_argument("--retain-task", default=None, help="default: the run's last eval task")
    at.add_argument("--subset", type=float, default=None, help="score a fraction of questions")
    at.add_argument("--workers", type=int, default=None, help="Ray Train workers on CPU")
    at.add_argument("--gpus", type=int, default=None, help="Ray Train workers, one GPU each")
    at.add_argument("--out", default=None, help="new folder for the results (default "
                    "raylens-attacks/<run>-<suite>-<time>)")
    at.add_argument("--resume", action="store_true", help="finish the suite in --out")
    at.add_argument("--no-track", action="store_true", help="no MLflow run")
    _seed_option(at)
    at.set_defaults(func=cmd_attack)


def _add_tool_commands(sub) -> None:
    """The toy world, the rehearsal cache, reports, sweep-file checks, cluster nodes, the UI."""
    toy = sub.add_parser("toyworld", help="the embedded toy world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_sub.add_parser("build", help="build or load from cache, print the baseline table")
    _seed_option(build)
    build.set_defaults(func=cmd_toyworld_build)

    reh = sub.add_parser("rehearsal", help="an offline cache of stand-ins for the real hub ids")
    reh_sub = reh.add_subparsers(dest="rehearsal_command", required=True)
    reh_build = reh_sub.add_parser(
        "build", help="write it into FOLDER (use as HF_HOME): the model, lens, corpora and "
                      "evaluation datasets the real sweeps name, real schema, toy content")
    reh_build.add_argument("folder", help="new or empty folder")
    _seed_option(reh_build)
    reh_build.set_defaults(func=cmd_rehearsal_build)

    rep = sub.add_parser("report", help="a sweep's results table from MLflow (seed-log shape)")
    rep.add_argument("experiment", help="MLflow experiment: the sweep's name")
    rep.add_argument("--uri", default=None, help="tracking URI (default $MLFLOW_TRACKING_URI "
                     "or sqlite:///raylens-mlflow.db here)")
    rep.add_argument("--format", choices=("md", "csv", "json"), default="md")
    rep.add_argument("--output", default=None, help="write to this file instead of printing")
    rep.set_defaults(func=cmd_report)

    from raylens.sweepfile import add_sweep_options

    for name, text in (("preflight", "check that everything a sweep file names is in the "
                        "local cache (every sweep runs this before its first trial)"),
                       ("prefetch", "download everything a sweep file names into the cache "
                        "(needs internet access)")):
        pre = sub.add_parser(name, help=text)
        pre.add_argument("sweep_file", help="a sweeps/*.py file")
        add_sweep_options(pre)
        pre.set_defaults(func=cmd_preflight)
    sw = sub.add_parser("sweep", help="run a sweep file (as `python FILE` does)")
    sw.add_argument("sweep_file", help="a sweeps/*.py file")
    add_sweep_options(sw)
    sw.set_defaults(func=cmd_sweep)

    cl = sub.add_parser("cluster", help="what cluster.yaml runs on the nodes (see README)")
    cl_sub = cl.add_subparsers(dest="cluster_command", required=True)
    secrets = cl_sub.add_parser("secrets", help="make the cluster's MLflow and database "
                                "secrets (once, where you run `ray up`)")
    secrets.add_argument("--path", default="~/.raylens/cluster.env")
    cl_sub.add_parser("setup-node", help="check this node and write its environment")
    cl_sub.add_parser("start-services", help="on the head: PostgreSQL, MLflow, Optuna dashboard")
    cl_sub.add_parser("stop-services", help="on the head: stop them")
    cl.set_defaults(func=cmd_cluster)

    fin = sub.add_parser("finalize", help="a sweep's finalists re-scored on every question and "
                         "attacked with the long suite; the final front")
    fin.add_argument("experiment", help="MLflow experiment: the sweep's name")
    fin.add_argument("--suite", default="long", help="attack suite (default long)")
    fin.add_argument("--uri", default=None, help="tracking URI (default as for report)")
    fin.add_argument("--workers", type=int, default=None, help="attacks as Ray Train workers")
    fin.add_argument("--gpus", type=int, default=None, help="... with one GPU each")
    _seed_option(fin)
    fin.set_defaults(func=cmd_finalize)

    ui = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1")
    ui.add_argument("--uri", default=None, help="tracking URI (default as for report)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    """The ``raylens`` argument parser with every subcommand."""
    parser = OneLineParser(prog="raylens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _quiet_libraries() -> None:
    """Progress bars and lm-eval's per-task notices drown the step log and tables."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Run one ``raylens`` command; bad input is one line naming the field, exit 2."""
    args = build_parser().parse_args(argv)
    if args.command != "cluster":  # cluster.yaml's node commands import none of these libraries
        _quiet_libraries()
    from raylens.cluster import ClusterError

    try:
        return args.func(args)
    except ClusterError as exc:
        print(f"raylens cluster: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"raylens: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        evaluate = sys.modules.get("raylens.evaluate")  # imported by whatever raised EvalError
        if evaluate is None or not isinstance(exc, evaluate.EvalError):
            raise
        print(f"raylens: evaluation failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
