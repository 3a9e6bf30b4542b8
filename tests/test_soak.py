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
from faultsoak import (
    HF_CANARY,
    KINDS,
    SWEEP_FILE,
    check,
    leaks,
    plan,
    records,
    run_with_faults,
)

pytestmark = [pytest.mark.faults, pytest.mark.any_world]

SEED = int(os.environ.get("RAYLENS_SOAK_SEED", "2026"))
TRIALS = int(os.environ.get("RAYLENS_SOAK_TRIALS", "30"))
CANARIES = {"HF_TOKEN": HF_CANARY,
            "MLFLOW_TRACKING_USERNAME": "canary-user",
            "MLFLOW_TRACKING_PASSWORD": "CANARYmlflowpassword42",
            "PGPASSWORD": "CANARYpostgrespassword42"}
FAULT_LOG = Path(tempfile.gettempdir()) / "raylens-soak-faults.jsonl"
"""Each fault as it is injected (one JSON line each), to follow a soak while it runs."""


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


def _driver(sweep_file: Path, root: Path, study_url: str, mlflow_uri: str, n: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(CANARIES)
    log = open(root / f"driver-{n}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(sweep_file), "--toy", "--storage", str(root / "runs"),
         "--study-url", study_url, "--set", f"tracking.tracking_uri={mlflow_uri}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _inject(event: dict, drivers: list, rng, start_driver, mlflow, pg) -> bool:
    """Inject one fault on this machine; False when there was nothing to hit (no Train worker
    right now)."""
    kind = event["kind"]
    if kind == "kill_worker":
        workers = _train_workers()
        if not workers:
            return False
        event["pid"] = rng.choice(workers)
        os.kill(event["pid"], signal.SIGKILL)
    elif kind == "kill_driver":  # the driver and the Ray instance it started
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


def test_soak_every_trial_is_accounted_for_once_and_no_secret_leaks(world, capsys, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="raylens-soak-"))
    pg = Postgres(root, CANARIES["PGPASSWORD"])
    mlflow = MlflowServer(root)
    sweep_file = root / "soak.py"
    sweep_file.write_text(SWEEP_FILE.format(trials=TRIALS, seed=SEED))
    rng = random.Random(SEED)
    faults = plan(rng, span=45.0 * TRIALS)
    count = iter(range(100))
    start_driver = lambda: _driver(sweep_file, root, pg.url, mlflow.uri, next(count))  # noqa: E731
    drivers: list = []
    try:
        injected, took = run_with_faults(
            drivers, start_driver, faults,
            lambda event, drivers: _inject(event, drivers, rng, start_driver, mlflow, pg),
            finished=lambda driver: driver.returncode in (0, 1), log_to=FAULT_LOG)
        assert {e["kind"] for e in injected} >= set(KINDS), injected  # every kind, once at least
        logs = "\n".join(p.read_text() for p in sorted(root.glob("driver-*.log")))
        assert drivers[-1].returncode in (0, 1), logs[-4000:]

        monkeypatch.setenv("PGPASSWORD", CANARIES["PGPASSWORD"])  # to read the study here
        study = optuna.load_study(study_name="soak", storage=optuna.storages.RDBStorage(pg.url))
        found = records(MlflowClient(mlflow.uri), study)
        trials_dir = root / "runs" / "soak" / "trials"
        statuses = check(found, TRIALS, {p.name for p in trials_dir.iterdir() if p.is_dir()})
        assert not list(trials_dir.glob("*/mlflow_pending.json"))

        # no canary in anything the sweep, MLflow, PostgreSQL or Ray wrote
        pg.stop()
        mlflow.stop()
        sessions = [p for p in Path("/tmp/ray").glob("session_2*")
                    if p.stat().st_mtime > time.time() - took - 60]
        searched, leaked = leaks([root, *sessions], CANARIES)
        assert searched > 100 and not leaked, leaked[:10]
        resumed = sum(1 for r in found["rows"] if (r["resumed_from"] or 0) > 0)
        with capsys.disabled():
            print(f"\nsoak (seed {SEED}): {TRIALS} trials in {took:.0f} s; faults injected: "
                  f"{json.dumps(injected)}; trials by status: {statuses}; lost: 0; resumed "
                  f"from a checkpoint: {resumed}; Optuna trials a killed driver left running: "
                  f"{found['optuna_driver_crashed']}; drivers started: {len(drivers)}; front "
                  f"{found['tagged_front']}; {searched} files searched for canaries, none found")
    finally:
        for proc in drivers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        mlflow.stop()
        pg.stop()
