"""Sweeps: objectives and the Pareto front, the sweep files, cluster.yaml, and a sweep whose
driver is killed and resumed."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raylens.config import ConfigError, SweepConfig, to_flat
from raylens.pareto import beaten_by, dominates, pareto_front
from raylens.recipes import recipe
from raylens.search import objectives

REPO = Path(__file__).resolve().parents[1]


def _report(wmdp, mmlu, retain_loss=1.0):
    return {"eval": {"toy_wmdp": {"acc": wmdp}, "toy_mmlu": {"acc": mmlu}},
            "retain_loss": retain_loss, "forget_loss": 1.0}


def test_objectives_mark_diverged_and_collapsed_trials_infeasible():
    sweep = SweepConfig(name="t", base=recipe("sft_adamw"), retain_floor=0.6,
                        space={"loss.retain_coef": ("log", 0.01, 1.0)})
    ok = objectives(_report(0.3, 0.9), sweep)
    assert ok["feasible"] and ok["infeasible"] == "" and ok["constraint"] == pytest.approx(-0.3)
    collapsed = objectives(_report(0.25, 0.4), sweep)
    assert not collapsed["feasible"] and collapsed["infeasible"] == "collapsed"
    assert collapsed["constraint"] == pytest.approx(0.2)
    diverged = objectives(_report(0.25, 0.9, retain_loss=float("nan")), sweep)
    assert diverged["infeasible"] == "diverged" and diverged["constraint"] == 1.0


@pytest.mark.parametrize("first", ["orphaned", "errored"])
@pytest.mark.parametrize("rerun", ["failed", "scored"])
def test_a_trial_rerun_after_a_crash_has_its_outcome_in_the_study(first, rerun, tmp_path):
    """A killed driver leaves its running trials RUNNING in the study; the resume marks them
    FAIL ("driver crashed"), and Tune reruns them and also retries trials that errored before
    the crash (told FAIL then). The rerun's outcome must reach the study as a trial of its own:
    the cluster soak found a failed rerun that only the crash's FAIL stood for, and the local
    soak a retried trial that scored on the front in MLflow but stayed FAIL in the study."""
    import optuna

    from raylens.recipes import demo_sweep
    from raylens.search import _searcher, fail_orphaned_trials

    url = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = demo_sweep(storage=str(tmp_path), name="orphans", num_trials=2)
    searcher = _searcher(sweep, url)
    params = searcher.suggest("t1")
    if first == "errored":  # a worker killed: Tune reports the error, Optuna is told FAIL
        searcher.on_trial_complete("t1", result=None, error=True)
    assert fail_orphaned_trials(url, "orphans") == (first == "orphaned")  # the resume
    if rerun == "failed":  # e.g. its evaluation ran out of time
        searcher.on_trial_complete("t1", result=None, error=True)
    else:
        searcher.on_trial_complete("t1", result={"wmdp": 0.3, "mmlu": 0.9, "constraint": -0.3,
                                                 "infeasible": ""})
    study = optuna.load_study(study_name="orphans", storage=url)
    assert len(study.trials) == 2  # the first attempt and the rerun's outcome
    trial = study.trials[-1]
    assert trial.user_attrs["tune_trial_id"] == "t1"
    assert trial.params == params
    if rerun == "failed":
        assert trial.state == optuna.trial.TrialState.FAIL
    else:
        assert trial.values == [0.3, 0.9] and trial.state == optuna.trial.TrialState.COMPLETE


def test_a_trial_whose_record_a_driver_crash_cut_short_is_recorded_on_the_rerun(tmp_path):
    """The cluster soak killed the driver 2 s after a trial wrote ``result.json``, while its
    process was writing the MLflow record: the run kept the status tag but stayed RUNNING, and
    the rerun only reported the file to Tune. Now the rerun finds the run not ended and records
    the trial from its folder; a run already ended is left as it is."""
    from mlflow.tracking import MlflowClient

    from raylens import tracking
    from raylens.recipes import demo_sweep
    from raylens.search import _finished_earlier, _kept, objectives

    sweep = demo_sweep(storage=str(tmp_path / "runs"), name="cut", num_trials=2, overrides={
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.artifact_location": str(tmp_path / "artifacts")})
    tracker = tracking.start_sweep(sweep, None)
    client = MlflowClient(tracker.uri)
    params = {"loss.retain_coef": 0.5, "optim.lr": 0.002}
    keep = _kept(sweep, "t1", params)
    out = tmp_path / "trials" / "t1"
    out.mkdir(parents=True)
    assert _finished_earlier(out, keep, sweep, tracker) is None  # nothing finished: it runs
    report = {"eval": None, "retain_loss": float("nan"), "forget_loss": float("nan"),
              "num_steps": 4, "diverged": "diverged: loss nan at step 4"}
    result = {**objectives(report, sweep), **{f"param/{k}": v for k, v in params.items()}}
    for name, text in (("result.json", json.dumps(result)), ("config.json", "{}"),
                       ("train_report.json", json.dumps(report)),
                       ("history.jsonl", json.dumps({"step": 1, "loss": 1.0}) + "\n")):
        (out / name).write_text(text)
    run_id = tracking.trial_run(tracker, "t1", sweep.base)
    client.set_tag(run_id, "status", "diverged")  # where the crash cut the record
    other = {**result, "param/optim.lr": 0.001}  # another trial's settings: it runs again
    (out / "result.json").write_text(json.dumps(other))
    assert _finished_earlier(out, keep, sweep, tracker) is None
    (out / "result.json").write_text(json.dumps(result))

    assert _finished_earlier(out, keep, sweep, tracker) == json.loads(json.dumps(result))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "diverged"
    assert run.data.tags["reason"].startswith("diverged: loss nan at step 4")
    ended = run.info.end_time
    _finished_earlier(out, keep, sweep, tracker)  # recorded: not written again
    assert client.get_run(run_id).info.end_time == ended
    assert not (out / "mlflow_pending.json").exists()


def test_pareto_front_keeps_undominated_feasible_rows_only():
    rows = [{"id": i, "forget_acc": w, "retain_acc": m, "feasible": f} for i, (w, m, f) in enumerate([
        (0.30, 0.90, True), (0.35, 0.95, True), (0.32, 0.89, True),  # 2 dominated by 0
        (0.25, 0.50, False),  # collapsed: lowest wmdp, never on the front
        (0.30, 0.90, True),   # a tie with 0: both stay
        (1.00, 1.00, True)])]
    assert [r["id"] for r in pareto_front(rows)] == [0, 4, 1, 5]
    assert dominates(rows[0], rows[2]) and not dominates(rows[0], rows[4])  # a tie: neither
    assert [r["id"] for r in beaten_by(rows[2], rows)] == [0, 4]  # not 3: infeasible


@pytest.mark.parametrize("bad, field", [
    (dict(space={"loss.nope": ("log", 1, 2)}), "sweep.space"),
    (dict(space={"loss.retain_coef": ("log", 0, 2)}), "sweep.space['loss.retain_coef']"),
    (dict(space={"loss.retain_coef": ("log", 1e-3, -1)}), "sweep.space['loss.retain_coef']"),
    (dict(space={"optim.warmup_ratio": ("uniform", 0.1, 2.0)}), "optim.warmup_ratio"),
    (dict(sampler="cmaes"), "sweep.sampler"),
    (dict(retain_task="mmlu"), "sweep.retain_task"),
    (dict(name="a b"), "sweep.name"),
    (dict(study_url="optuna.db"), "sweep.study_url"),
])
def test_bad_sweeps_are_rejected_naming_the_field(bad, field):
    settings = dict(name="t", base=recipe("sft_adamw"),
                    space={"loss.retain_coef": ("log", 0.01, 1.0)}) | bad
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        SweepConfig(**settings)


# (file, seed-log values each searched setting must cover)
SEED_GRID = {
    "lora_adamw": {"loss.retain_coef": [5.0], "loss.remove_coef": [5.0], "optim.lr": [1e-3]},
    "sft_adamw": {"loss.retain_coef": [15, 50, 100, 200, 400, 500],
                  "loss.remove_coef": [1, 5, 10, 15, 20], "optim.lr": [1e-5, 5e-5, 1e-4, 5e-4]},
    "sft_muon": {"loss.retain_coef": [1, 1.5, 2, 2.5, 3], "loss.remove_coef": [0.5, 1, 1.5, 2],
                 "optim.muon_lr": [1e-3], "optim.adam_lr": [3e-4]},
    "fsdp2_muon": {"loss.retain_coef": [5, 20, 50, 100, 400], "loss.remove_coef": [5],
                   "optim.muon_lr": [0.02]},
}


# (file, the objective and optimizer of its seed table: docs/method.md)
SEED_OBJECTIVE = {
    "lora_adamw": {"loss.retain_loss": "l2", "loss.retain_layers": "all",
                   "loss.retain_reduction": "padded_position", "loss.retain_start": 0.0},
    "sft_adamw": {"loss.retain_loss": "kl", "loss.retain_reduction": "sequence",
                  "loss.retain_start": 0.25, "optim.adam_betas": [0.9, 0.999]},
    "sft_muon": {"loss.retain_loss": "kl", "loss.retain_reduction": "sequence",
                 "loss.retain_start": 0.0, "optim.muon_adjust_lr": "match_rms_adamw",
                 "optim.adam_betas": [0.9, 0.95]},
    "fsdp2_muon": {"loss.retain_loss": "kl", "loss.retain_reduction": "sequence",
                   "loss.retain_start": 0.25, "optim.muon_adjust_lr": "match_rms_adamw",
                   "optim.adam_betas": [0.9, 0.95]},
}


@pytest.mark.parametrize("name", sorted(SEED_GRID))
def test_sweep_files_build_the_seed_recipes_without_a_gpu(name):
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", REPO / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real, toy = module.REAL, module.TOY
    assert isinstance(real, SweepConfig) and isinstance(toy, SweepConfig)
    flat = to_flat(real.base)
    assert flat["model.name_or_path"] == "EleutherAI/deep-ignorance-unfiltered"
    assert flat["lens.name_or_path"] == "EleutherAI/deep-ignorance-unfiltered-lens"
    assert tuple(flat["loss.target_layers"]) == (5, 10, 15, 20, 25, 30)
    assert flat["batch.global_batch"] == 32 and flat["scaling.use_gpu"] is True
    assert (real.forget_task, real.retain_task) == ("wmdp_bio_robust", "mmlu")
    for key, values in SEED_GRID[name].items():
        kind, low, high = real.space[key]
        assert kind == "log" and all(low <= v <= high for v in values), key
    assert toy.base.model.name_or_path == "toy" and toy.num_trials >= 1
    assert {key: flat[key] for key in SEED_OBJECTIVE[name]} == SEED_OBJECTIVE[name]
    # full fine-tuning keeps fp32 master weights whatever the compute dtype
    assert flat["model.dtype"] == "bfloat16"


def test_cluster_yaml_validates_offline_with_rays_own_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == 3
    broken = dict(config, max_wrokers=3)
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_avoids_the_known_launch_blockers():
    """What stopped ``ray up`` before: a mount outside the SSH user's home (rsynced before any
    command can create it), the whole tree shipped (.venv included), token auth without a
    token, a ``pkill -f`` matching its own shell, addresses written outside ``provider``. The
    cluster rehearsal (``make test-cluster``) runs the file; this is the cheap check."""
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mounts = config["file_mounts"]
    assert all(target.startswith("~/") for target in mounts), mounts
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert ".gitignore" in config["rsync_filter"]
    assert ".venv" in (REPO / ".gitignore").read_text()
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(key) or []]
    assert not any("pkill" in c or "killall" in c for c in commands)
    assert any("chmod 600 ~/.ray/auth_token" in c for c in commands)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "--node-ip-address=$RAYLENS_NODE_IP" in start and "TRAIN_DRIVER" in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    addresses = [config["provider"]["head_ip"], *config["provider"]["worker_ips"]]
    rest = yaml.safe_dump({k: v for k, v in config.items() if k != "provider"})
    assert not [a for a in addresses if a in rest]


def test_cluster_yaml_refuses_a_python_older_than_3_11_naming_the_version(tmp_path):
    """Setup's Python check, run as ray up runs it (bash, ``python3`` from PATH) against a
    ``python3`` that reports 3.10.14, and against this one."""
    import yaml

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (check,) = [c for c in config["setup_commands"] if "version_info" in c]
    fake = tmp_path / "python3"
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "sys.version_info, sys.version = (3, 10, 14, 'final', 0), '3.10.14 (main)'\n"
                    "code = sys.argv[2]\nsys.argv = ['-c']\nexec(code)\n")
    fake.chmod(0o755)
    old = subprocess.run(["bash", "-c", check], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert old.returncode == 1
    assert old.stderr.strip() == "raylens needs Python >= 3.11 on every node; python3 is 3.10.14"
    here = subprocess.run(["bash", "-c", check], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                     f"{os.environ['PATH']}"})
    assert here.returncode == 0, here.stderr


def _demo(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "RAY_ADDRESS", "MLFLOW_"))}
    return subprocess.Popen([sys.executable, "-m", "raylens.cli", "demo", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.integration
@pytest.mark.any_world  # its one build-sensitive check (fast scorer = lm-eval on the unmodified
# model) is test_scorer's per-question agreement on that model, which the fresh world reruns
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(world, tmp_path):
    """SIGKILL the demo's driver (and the Ray instance it started) once two trials have
    finished, run the same command again: the finished trials keep their results untouched, every
    trial appears once, and Optuna's Pareto front is the one computed from Tune's results."""
    import optuna

    from raylens.recipes import demo_sweep
    from raylens.search import optuna_front, paths

    args = ["--name", "killed", "--trials", "4", "--storage", str(tmp_path / "runs"),
            "--set", "data.num_examples=256"]
    sweep = demo_sweep(storage=str(tmp_path / "runs"), name="killed", num_trials=4,
                       overrides={"data.num_examples": 256})
    trials = paths(sweep).trials
    driver = _demo(args, tmp_path)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list(trials.glob("*/result.json"))) >= 2:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the sweep ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = {p.parent.name: (p.stat().st_mtime_ns, p.read_text())
                for p in trials.glob("*/result.json")}
    assert len(finished) >= 2

    resumed = _demo(args, tmp_path)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming sweep killed" in out
    for trial_id, (mtime, text) in finished.items():  # not rerun
        path = trials / trial_id / "result.json"
        assert path.stat().st_mtime_ns == mtime and path.read_text() == text
    results = {p.parent.name: json.loads(p.read_text()) for p in trials.glob("*/result.json")}
    assert len(results) == 4
    after = out[out.index("* = Pareto front"):].splitlines()
    table = [line for line in after if line.startswith("| ") and "toy_wmdp" not in line]
    ids = [line.rsplit("|", 2)[-2].strip() for line in table]
    assert sorted(ids) == sorted(results)  # every trial once
    study = optuna.load_study(study_name="killed", storage=paths(sweep).study_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(results)
    tune_front = sorted(tid for tid, r in results.items()
                        if r["feasible"] and tid in {x["trial_id"] for x in pareto_front(
                            [{"forget_acc": v["wmdp"], "retain_acc": v["mmlu"],
                              "feasible": v["feasible"], "trial_id": k}
                             for k, v in results.items()])})
    assert optuna_front(sweep) == tune_front
    pareto_lines = [line for line in table if line.startswith("| * |")]
    assert len(pareto_lines) == len(tune_front) >= 1
    _check_mlflow(tmp_path / "raylens-mlflow.db", results, optuna_front(sweep), world.baseline)


def _check_mlflow(db: Path, results: dict, optuna_best: list[str], baseline: dict) -> None:
    """After the killed and resumed demo, MLflow holds the sweep run and one finished nested run
    per trial with its params, one point per step (the rerun trial logged no step twice), eval
    metrics equal to the trial's results, artifacts, and pareto=true exactly on Optuna's best
    trials; the report rebuilt from MLflow has one row per trial, the front marked."""
    from mlflow.tracking import MlflowClient

    from raylens.tracking import report, trial_rows

    client = MlflowClient(f"sqlite:///{db}")
    parent, rows = trial_rows(client, "killed")
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
    # the unmodified model, scored by the fast scorer in the sweep, as lm-eval scored it in the build
    assert parent["metrics"]["baseline/toy_wmdp"] == baseline["main"]["toy_wmdp"]
    assert sorted(r["trial_id"] for r in rows) == sorted(results)
    for row in rows:
        result = results[row["trial_id"]]
        assert client.get_run(row["run_id"]).info.status == "FINISHED"
        assert row["params"]["optim.lr"] == str(result["param/optim.lr"])
        assert row["metrics"]["eval/toy_wmdp"] == result["acc/toy_wmdp"] == row["forget_acc"]
        steps = [m.step for m in client.get_metric_history(row["run_id"], "train/loss")]
        assert steps == list(range(1, result["num_steps"] + 1))
        artifacts = {a.path for a in client.list_artifacts(row["run_id"])}
        assert {"config.json", "history.jsonl", "eval", "model"} <= artifacts
    assert sorted(r["trial_id"] for r in rows if r["pareto"]) == optuna_best
    # the front was redrawn as trials finished (once per trial, and at the end), not only once
    finished = [m.value for m in client.get_metric_history(parent["run_id"], "trials/finished")]
    assert len(finished) >= len(results) and finished[-1] == len(results)
    assert finished == sorted(finished)
    table = json.loads(report(client, "killed", "json"))["rows"]
    assert len(table) == 1 + len(results)
    assert sum("hand-tuned base" in r["notes"] for r in table) == 1  # the first trial
    marked = {r["notes"].split(";")[0] for r in table if r["pareto"]}
    assert sorted(marked) == optuna_best


_JOIN = """
import importlib.util, json, sys
import ray
from raylens.search import connect_or_start
spec = importlib.util.spec_from_file_location("sweep", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
connect_or_start(module.REAL)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "slots": ray.cluster_resources().get("TRAIN_DRIVER")}))
"""


@pytest.mark.integration
def test_a_sweep_on_a_running_head_without_ray_address_joins_it(tmp_path):
    """As ``ray submit`` runs a sweep file on the head: a head started by ``ray start --head``,
    no RAY_ADDRESS in the environment. The sweep joins that head (it used to pass its own
    resources to ``ray.init`` and die: "When connecting to an existing cluster, resources must
    not be provided")."""
    ray_bin = Path(sys.executable).parent / "ray"
    tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # short: Ray's unix sockets live here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_TMPDIR=str(tmp), HOME=str(tmp_path))
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
         "--resources", '{"TRAIN_DRIVER": 3}', "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        head = (tmp / "ray" / "ray_current_cluster").read_text().strip()
        joined = subprocess.run([sys.executable, "-c", _JOIN, str(REPO / "sweeps" / "sft_muon.py")],
                                env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert joined.returncode == 0, joined.stderr[-3000:]
        seen = json.loads(joined.stdout.strip().splitlines()[-1])
        assert seen == {"gcs": head, "slots": 3.0}  # the head's slots, not a new instance's
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_finished_trials_drop_checkpoints_and_front_retention_drops_dominated_exports(tmp_path):
    from raylens.search import SweepPaths, _drop_checkpoints, _drop_dominated_exports

    where = SweepPaths(tmp_path / "sweep")
    run = where.train / "t1"
    for name in ("checkpoint_2026-01-01_00-00-00.0", "checkpoint_2026-01-01_00-00-01.0"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _drop_checkpoints(where, "t1") == 2
    assert [p.name for p in run.iterdir()] == ["checkpoint_manager_snapshot.json"]
    assert _drop_checkpoints(where, "never-ran") == 0

    rows = []
    for trial, pareto in (("front", True), ("dominated", False), ("failed", False)):
        folder = where.trials / trial
        (folder / "model").mkdir(parents=True)
        (folder / "history.jsonl").write_text("{}\n")
        rows.append({"trial_id": trial, "pareto": pareto,
                     "trial_dir": str(folder) if trial != "failed" else None})
    outside = tmp_path / "elsewhere" / "model"  # a row pointing outside the sweep is left alone
    outside.mkdir(parents=True)
    rows.append({"trial_id": "outside", "pareto": False, "trial_dir": str(outside.parent)})
    assert _drop_dominated_exports(rows, where) == ["dominated"]
    assert (where.trials / "front" / "model").is_dir() and outside.is_dir()
    assert not (where.trials / "dominated" / "model").exists()
    assert (where.trials / "dominated" / "history.jsonl").exists()  # the record stays


@pytest.mark.integration
@pytest.mark.any_world
def test_trials_run_on_a_node_that_joins_mid_sweep(world, tmp_path, monkeypatch):
    """Concurrency follows the TRAIN_DRIVER slots as nodes join, not the slots seen at submit
    time: a sweep starts on a head with one slot; while the first trial holds it, a node with
    another joins (``ray start --address``, as cluster.yaml starts a worker) and two trials then
    run at once (the old cap, the one slot seen at submit time, never let a second start).
    Every trial, on either node, scores the questions the driver encoded (cut here to the
    first 20 of each task, which no worker loading the tasks itself would score)."""
    import dataclasses
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from raylens import search
    from raylens.recipes import demo_sweep
    from raylens.search import DRIVER_RESOURCE, run_sweep

    encoded = search.encoded_questions
    monkeypatch.setattr(search, "encoded_questions", lambda *a: {
        key: {task: qs[:20] for task, qs in sets.items()} for key, sets in encoded(*a).items()})

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 1, "resources": {DRIVER_RESOURCE: 1}, "include_dashboard": False})
    sweep = dataclasses.replace(
        demo_sweep(storage=str(tmp_path / "runs"), name="joined", num_trials=3,
                   overrides={"data.num_examples": 64, "scaling.num_workers": 1,
                              "tracking.enabled": False}),
        evaluate_baseline=False)
    busy, done, joined = [], threading.Event(), []

    def watch():  # a node joins once the head's slot is taken; sample the slots in use
        while not done.is_set():
            total = ray.cluster_resources().get(DRIVER_RESOURCE, 0)
            used = total - ray.available_resources().get(DRIVER_RESOURCE, 0)
            busy.append(used)
            if used >= 1 and not joined:
                joined.append(subprocess.Popen(
                    [str(Path(sys.executable).parent / "ray"), "start", "--block",
                     f"--address={cluster.address}", "--num-cpus=1",
                     f"--resources={{\"{DRIVER_RESOURCE}\": 1}}", "--disable-usage-stats"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = run_sweep(sweep, toyworld=world.root, log=lambda message: None)
    finally:
        done.set()
        watcher.join(timeout=30)
        for node in joined:
            node.terminate()
            node.wait(timeout=60)
        ray.shutdown()
        cluster.shutdown()
    assert joined, "the first trial never took the head's slot"
    assert len(rows) == 3 and not [r["error"] for r in rows if r["error"]]
    assert max(busy) == 2, f"slots in use over the sweep: {sorted(set(busy))}"
    for report in (tmp_path / "runs").glob("joined/trials/*/train_report.json"):
        scored = json.loads(report.read_text())["eval"]
        assert {task: s["n"] for task, s in scored.items()} == {"toy_wmdp": 20, "toy_mmlu": 20}
    assert len(list((tmp_path / "runs").glob("joined/trials/*/train_report.json"))) == 3
