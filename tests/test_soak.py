"""The soak: a toy sweep of 30 trials with the short attack suite on every trial, against a real
MLflow server and a real PostgreSQL study, with faults injected at times and of kinds a seed
picks: Ray Train workers SIGKILLed (during training, scoring or the attacks, wherever the time
falls), the sweep driver SIGKILLed and started again, the MLflow server stopped for a while and
started again, PostgreSQL restarted. The search space itself reaches the per-trial faults: a
learning rate up to 300 (a NaN loss: stopped early, diverged), a retain coefficient down to
1e-3 (a collapsed model) and an evaluation time limit of 0.05 s on some trials (an evaluation
that cannot finish: failed with the reason). A Hugging Face token and the MLflow and PostgreSQL
passwords are planted as canaries.

At the end every trial is accounted for exactly once in MLflow and in the Optuna study, with its
status and reason, none is lost, the front MLflow marks is the one recomputed from the surviving
trials and Optuna's, and no canary is in any file the sweep, MLflow, PostgreSQL or Ray wrote.

    make test-faults          # with the other fault tests; about 30 minutes on 2 cores
    RAYLENS_SOAK_SEED=7 ...   # another fault plan
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.any_world]

SEED = int(os.environ.get("RAYLENS_SOAK_SEED", "2026"))
TRIALS = int(os.environ.get("RAYLENS_SOAK_TRIALS", "30"))
CANARIES = {"HF_TOKEN": "hf_CANARYhuggingface0123456789",
            "MLFLOW_TRACKING_USERNAME": "canary-user",
            "MLFLOW_TRACKING_PASSWORD": "CANARYmlflowpassword42",
            "PGPASSWORD": "CANARYpostgrespassword42"}
FAULT_LOG = Path(tempfile.gettempdir()) / "raylens-soak-faults.jsonl"
"""Each fault as it is injected (one JSON line each), to follow a soak while it runs."""
KINDS = ("kill_worker", "kill_driver", "mlflow_down", "postgres_restart")

SWEEP_FILE = """
import sys
from raylens.cli import sweep_main
from raylens.config import SweepConfig
from raylens.recipes import recipe
from raylens.config import replace

BASE = replace(recipe("sft_adamw"), {{"data.num_examples": 64, "scaling.checkpoint_every": 2,
                                      "scaling.max_failures": 2}})
TOY = REAL = SweepConfig(
    name="soak", base=BASE, num_trials={trials}, retain_floor=0.6, seed={seed},
    space={{"optim.lr": ("log", 1e-5, 300.0), "loss.retain_coef": ("log", 1e-3, 10.0),
            "eval.time_limit_s": ("choice", (0.05, 1800.0, 1800.0, 1800.0))}},
    attack_suite="short")

if __name__ == "__main__":
    sys.exit(sweep_main(REAL, TOY))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {timeout:g} s")


class Postgres:
    """A PostgreSQL 15 server of Debian's package in a fresh data folder, as user postgres,
    on 127.0.0.1 only, password authentication."""

    def __init__(self, root: Path, password: str):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins or os.geteuid() != 0:
            pytest.skip("needs Debian's postgresql and root (make test-cluster installs it)")
        self.bin, self.data, self.port = bins[-1], root / "pg", _port()
        root.chmod(0o755)
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        pwfile = root / "pw"
        pwfile.write_text(password)
        shutil.chown(pwfile, "postgres", "postgres")
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "raylens",
                           "--auth=scram-sha-256", f"--pwfile={pwfile}"])
        pwfile.unlink()
        self.start()
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "raylens", "optuna"], check=True, env=env)

    def _as_postgres(self, argv) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, cwd="/")
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                           str(self.data / "server.log"), "-o",
                           f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                           f"-c unix_socket_directories={self.data}", "start"])

    def restart(self) -> None:  # -l: the new server must not hold our pipes open
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast",
                           "-l", str(self.data / "server.log"), "restart"])

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D",
                        str(self.data), "-w", "-m", "fast", "stop"], capture_output=True,
                       cwd="/")

    @property
    def url(self) -> str:  # the password comes from PGPASSWORD, never from the URL
        return f"postgresql+psycopg2://raylens@127.0.0.1:{self.port}/optuna"


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and served artifacts."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _port(), None
        self.start()

    def start(self) -> None:
        log = open(self.root / "mlflow-server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 120)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _train_workers() -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def _plan(rng: random.Random, span: float) -> list[tuple[float, str]]:
    """Every kind once and three more drawn at random, at random times over ``span`` s."""
    kinds = [*KINDS, *rng.choices(KINDS, k=3)]
    return sorted((rng.uniform(150, span), kind) for kind in kinds)


def _driver(sweep_file: Path, root: Path, study_url: str, mlflow_uri: str, n: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(CANARIES)
    log = open(root / f"driver-{n}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(sweep_file), "--toy", "--storage", str(root / "runs"),
         "--study-url", study_url, "--set", f"tracking.tracking_uri={mlflow_uri}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _inject(event: dict, rng, drivers: list, start_driver, mlflow, pg) -> bool:
    """Inject one fault; False when there was nothing to hit (no Train worker right now)."""
    kind = event["kind"]
    if kind == "kill_worker":
        workers = _train_workers()
        if not workers:
            return False
        event["pid"] = rng.choice(workers)
        os.kill(event["pid"], signal.SIGKILL)
    elif kind == "kill_driver":
        os.killpg(drivers[-1].pid, signal.SIGKILL)
        drivers[-1].wait()
        time.sleep(5)
        drivers.append(start_driver())
    elif kind == "mlflow_down":
        mlflow.stop()
        event["down_s"] = rng.randint(20, 60)
        time.sleep(event["down_s"])
        mlflow.start()
    else:
        pg.restart()
    return True


def _run_with_faults(drivers: list, plan, rng, start_driver, mlflow, pg) -> tuple[list[dict],
                                                                                   float]:
    """Run the sweep to its end, injecting the planned faults; a driver that ends by itself
    before the plan is through with an error (MLflow down as it started) is started again, as
    its operator would. ``drivers`` gets every driver started; returns the faults injected and
    the seconds it took."""
    drivers.append(start_driver())
    injected: list[dict] = []
    start = time.monotonic()
    while drivers[-1].poll() is None or plan:
        now = time.monotonic() - start
        if drivers[-1].poll() is not None:
            if drivers[-1].returncode in (0, 1) or len(drivers) > 12:
                break
            injected.append({"kind": "driver_ended", "code": drivers[-1].returncode,
                             "at_s": round(now)})
            drivers.append(start_driver())
        if plan and now >= plan[0][0]:
            event = {"kind": plan.pop(0)[1], "at_s": round(now)}
            if _inject(event, rng, drivers, start_driver, mlflow, pg):
                injected.append(event)
                with open(FAULT_LOG, "a") as f:  # pytest captures this process's output
                    f.write(json.dumps(event) + "\n")
            else:
                plan.insert(0, (now + 5, event["kind"]))  # between trials: again shortly
        time.sleep(1)
    if drivers[-1].returncode not in (0, 1):  # ended with MLflow down: the rerun writes it all
        drivers.append(start_driver())
        drivers[-1].wait(3600)
    return injected, time.monotonic() - start


def _leaks(places: list[Path]) -> tuple[int, list[str]]:
    """How many files were searched and which hold a canary."""
    searched, leaks = 0, []
    for place in places:
        for path in place.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            searched += 1
            leaks += [f"{path}: {k}" for k, v in CANARIES.items() if v.encode() in data]
    return searched, leaks


def _check_trial(client, row: dict) -> None:
    """One trial's record: a final status, its reason, the attacks where they ran."""
    status = row["status"]
    assert status in ("ok", "collapsed", "diverged", "failed"), row
    assert client.get_run(row["run_id"]).info.status in ("FINISHED", "FAILED")
    if status == "failed":
        assert row["tags"].get("failure_reason"), row["tags"]
    elif status != "ok":
        assert row["tags"].get("reason", "").startswith(status), row["tags"]
    if status in ("ok", "collapsed"):
        assert row["attack_acc"] is not None, row  # the attacks ran and were recorded


def _check_records(mlflow_uri: str, study_url: str, trials_dir: Path, trials: int):
    """Every trial once in MLflow and once in the Optuna study, each with its final status and
    reason, nothing pending; MLflow's front = the one recomputed from the surviving trials =
    Optuna's. Returns the trials by status and the front."""
    import optuna
    from mlflow.tracking import MlflowClient

    from raylens.pareto import pareto_front
    from raylens.tracking import trial_rows

    client = MlflowClient(mlflow_uri)
    _, rows = trial_rows(client, "soak")
    mlflow_ids = [r["trial_id"] for r in rows]
    assert len(rows) == trials and len(set(mlflow_ids)) == trials, mlflow_ids
    study = optuna.load_study(study_name="soak", storage=optuna.storages.RDBStorage(study_url))
    counted = [t.user_attrs.get("tune_trial_id") for t in study.trials
               if t.state.is_finished() and t.user_attrs.get("failed_because") != "driver crashed"]
    assert sorted(counted) == sorted(mlflow_ids), (counted, mlflow_ids)
    on_disk = {p.name for p in trials_dir.iterdir() if p.is_dir()}
    assert on_disk <= set(mlflow_ids), on_disk - set(mlflow_ids)
    statuses: dict[str, int] = {}
    for row in rows:
        _check_trial(client, row)
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    assert not list(trials_dir.glob("*/mlflow_pending.json"))
    recomputed = sorted(r["trial_id"] for r in pareto_front(
        [r for r in rows if r["status"] != "failed"]))
    tagged = sorted(r["trial_id"] for r in rows if r["pareto"])
    best = sorted(t.user_attrs["tune_trial_id"] for t in study.best_trials)
    assert tagged == recomputed == best and tagged, (tagged, recomputed, best)
    return statuses, tagged


def test_soak_every_trial_is_accounted_for_once_and_no_secret_leaks(world, capsys, monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="raylens-soak-"))
    pg = Postgres(root, CANARIES["PGPASSWORD"])
    mlflow = MlflowServer(root)
    sweep_file = root / "soak.py"
    sweep_file.write_text(SWEEP_FILE.format(trials=TRIALS, seed=SEED))
    rng = random.Random(SEED)
    plan = _plan(rng, span=45.0 * TRIALS)
    count = iter(range(100))
    start_driver = lambda: _driver(sweep_file, root, pg.url, mlflow.uri, next(count))  # noqa: E731
    drivers: list = []
    try:
        injected, took = _run_with_faults(drivers, plan, rng, start_driver, mlflow, pg)
        logs = "\n".join(p.read_text() for p in sorted(root.glob("driver-*.log")))
        assert drivers[-1].returncode in (0, 1), logs[-4000:]

        monkeypatch.setenv("PGPASSWORD", CANARIES["PGPASSWORD"])  # to read the study here
        statuses, tagged = _check_records(mlflow.uri, pg.url, root / "runs" / "soak" / "trials",
                                          TRIALS)

        # no canary in anything the sweep, MLflow, PostgreSQL or Ray wrote
        pg.stop()
        mlflow.stop()
        sessions = [p for p in Path("/tmp/ray").glob("session_2*")
                    if p.stat().st_mtime > time.time() - took - 60]
        searched, leaks = _leaks([root, *sessions])
        assert searched > 100 and not leaks, leaks[:10]
        with capsys.disabled():
            print(f"\nsoak (seed {SEED}): {TRIALS} trials in {took:.0f} s; faults injected: "
                  f"{json.dumps(injected)}; trials by status: {statuses}; lost: 0; drivers "
                  f"started: {len(drivers)}; front {tagged}; {searched} files searched for "
                  "canaries, none found")
    finally:
        for proc in drivers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        mlflow.stop()
        pg.stop()
