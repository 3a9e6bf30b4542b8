"""What ``cluster.yaml`` runs on the nodes, as code that tests can run: the cluster's secrets,
a node's checks and environment, and the head's services (PostgreSQL, the authenticated MLflow
server, the Optuna dashboard), each started from a pidfile, never by pattern.

The files, all owner-only, in ``~/.raylens/`` of the cluster's SSH user:

- ``cluster.env`` (made once by ``raylens cluster secrets`` where ``ray up`` runs, shipped to
  every node by ``cluster.yaml``'s file mounts): the MLflow user and password the trials log
  with, the MLflow server's session secret and the database password;
- ``node.env`` (written on each node by ``raylens cluster setup-node``, sourced by the SSH
  user's ``~/.bashrc``, so every Ray process inherits it): where the head, the shared folder, the
  Hugging Face cache, the sweeps' storage and the Optuna study are, Ray's token mode and MLflow's
  client credentials (MLflow reads ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``; no URL carries a
  credential);
- on the head, ``~/.pgpass`` (libpq reads the database password from it) and the pidfiles.

A node's own address is the one the launcher reached it at (``$SSH_CONNECTION``), the head's is
``$RAY_HEAD_IP`` (set by Ray's autoscaler on workers), so no address is written outside the
provider section of ``cluster.yaml``. Environment read on the nodes (set it before ``ray up``,
for example in the SSH user's ``~/.bashrc``): ``RAYLENS_SHARED`` (default ``/shared``) and
``RAYLENS_NODE_GPUS=0`` for a CPU-only node (the check then skips CUDA).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAYLENS_DB_PASSWORD")
"""What ``cluster.env`` holds."""

DB_USER = "raylens"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
MLFLOW_PORT = 5000
DASHBOARD_PORT = 8080
MIN_PYTHON = (3, 11)


class ClusterError(RuntimeError):
    """A node is not fit to join, or a service did not come up; the message says what to fix."""


@dataclass(frozen=True)
class Node:
    """Where one node keeps its state: ``home`` (the SSH user's), ``shared`` (the same folder on
    every node), its own address and the head's."""

    home: Path
    shared: Path
    node_ip: str
    head_ip: str

    @property
    def dir(self) -> Path:
        """This node's private raylens folder."""
        return self.home / ".raylens"

    @property
    def is_head(self) -> bool:
        """Whether this node is the head."""
        return self.node_ip == self.head_ip

    @property
    def head_marker(self) -> Path:
        """Written into the shared folder by the head's ``setup-node`` (it is set up before any
        worker): a worker that does not find it, naming its head, has another folder there."""
        return self.shared / "raylens" / "head"

    @property
    def db_port(self) -> int:
        """The head's PostgreSQL port."""
        return int(os.environ.get("RAYLENS_DB_PORT", "5432"))

    def db_url(self, database: str) -> str:
        """SQLAlchemy URL without a password (libpq reads it from ``~/.pgpass``)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.db_port}/{database}"

    @classmethod
    def here(cls) -> "Node":
        """This node, as the launcher's SSH session and the environment describe it."""
        node_ip = node_address()
        return cls(home=Path.home(), shared=Path(os.environ.get("RAYLENS_SHARED", "/shared")),
                   node_ip=node_ip, head_ip=os.environ.get("RAY_HEAD_IP") or node_ip)


def node_address() -> str:
    """The address the launcher reached this node at: the server side of ``$SSH_CONNECTION``
    (the provider section's address for it), else ``$RAYLENS_NODE_IP``."""
    connection = os.environ.get("SSH_CONNECTION", "").split()
    if len(connection) == 4:
        return connection[2]
    if os.environ.get("RAYLENS_NODE_IP"):
        return os.environ["RAYLENS_NODE_IP"]
    raise ClusterError("cannot tell this node's address: no $SSH_CONNECTION (run through the "
                       "cluster launcher's SSH) and no $RAYLENS_NODE_IP")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (values shell-quoted as ``write_env_file`` writes them)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            parts = shlex.split(value)
            values[key.strip()] = parts[0] if parts else ""
    return values


def write_env_file(path: Path, values: dict[str, str], header: str) -> None:
    """Write ``values`` as a shell-quoted env file readable by its owner only."""
    lines = [f"# {header}"] + [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    _write_private(path, "\n".join(lines) + "\n")


def make_secrets(path: Path, *, user: str = "raylens") -> Path:
    """Write a new ``cluster.env`` with random passwords; refuse to replace an existing one
    (the running cluster's database and MLflow users were made with it)."""
    if path.exists():
        raise ClusterError(f"{path} exists: it holds the secrets of a cluster already set up "
                           "(delete it only together with the head's ~/raylens-pg)")
    values = {"MLFLOW_TRACKING_USERNAME": user,
              "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
              "RAYLENS_DB_PASSWORD": secrets.token_urlsafe(24)}
    write_env_file(path, values, "raylens cluster secrets: ship to every node, owner-only")
    return path


def load_secrets(node: Node) -> dict[str, str]:
    """The cluster's credentials from this node's ``cluster.env``."""
    path = node.dir / "cluster.env"
    if not path.exists():
        raise ClusterError(f"{path} is missing: run `raylens cluster secrets` where you run "
                           "`ray up` (cluster.yaml ships it to every node)")
    values = read_env_file(path)
    missing = [k for k in SECRET_KEYS if not values.get(k)]
    if missing:
        raise ClusterError(f"{path} lacks {', '.join(missing)}: make it with "
                           "`raylens cluster secrets`")
    return values


def check_node(node: Node) -> list[str]:
    """What makes this node unfit to join, as messages (empty: fit): Python, torch's CUDA (unless
    ``RAYLENS_NODE_GPUS=0``), the shared folder (mounted, writable with working file locks, on a
    worker the head's), the token and secrets owner-only."""
    problems = []
    if sys.version_info < MIN_PYTHON:
        problems.append(f"Python {sys.version.split()[0]} is too old: raylens needs >= 3.11")
    if os.environ.get("RAYLENS_NODE_GPUS") != "0":
        try:
            import torch

            if not torch.cuda.is_available():
                problems.append(
                    f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: the "
                    "CUDA 13 build of torch 2.13 needs NVIDIA driver >= 580 (nvidia-smi shows "
                    "it); set RAYLENS_NODE_GPUS=0 on a node meant to run without GPUs")
        except ImportError as exc:
            problems.append(f"torch does not import: {exc}")
    if not node.shared.is_dir():  # never made here: a local folder would pass for the shared one
        problems.append(f"shared folder {node.shared} does not exist: mount the cluster's shared "
                        "file system there, or set RAYLENS_SHARED to where it is mounted")
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=node.shared, prefix=".raylens-lock-") as probe:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the datasets cache locks
                fcntl.flock(probe, fcntl.LOCK_UN)
        except OSError as exc:
            problems.append(f"shared folder {node.shared}: {exc} (it must be writable, with "
                            "working file locks, on every node)")
        if not node.is_head:
            seen = node.head_marker.read_text().strip() if node.head_marker.is_file() else None
            if seen != node.head_ip:
                problems.append(
                    f"shared folder {node.shared} is not the head's: {node.head_marker} "
                    + ("is missing" if seen is None else f"names head {seen}")
                    + f" (the head {node.head_ip} writes it when it is set up); mount the same "
                    "file system on every node")
    for path in (node.home / ".ray" / "auth_token", node.dir / "cluster.env"):
        if not path.exists():
            problems.append(f"{path} is missing (cluster.yaml's file_mounts ship it)")
        elif path.stat().st_mode & 0o077:
            problems.append(f"{path} is readable by others: chmod 600 it")
    return problems


def setup_node(node: Node) -> Path:
    """Check the node (``ClusterError`` listing every problem), make the shared folders and write
    ``node.env``; returns its path."""
    problems = check_node(node)
    if problems:
        raise ClusterError("this node cannot join the cluster:\n  " + "\n  ".join(problems))
    for sub in ("raylens/runs", "raylens/mlflow/artifacts", "hf/hub", "hf/datasets"):
        (node.shared / sub).mkdir(parents=True, exist_ok=True, mode=0o750)
    if node.is_head:
        node.head_marker.write_text(node.head_ip + "\n")
    creds = load_secrets(node)
    values = {
        "RAYLENS_NODE_IP": node.node_ip, "RAYLENS_HEAD_IP": node.head_ip,
        "RAYLENS_SHARED": str(node.shared),
        "RAYLENS_STORAGE": str(node.shared / "raylens" / "runs"),
        "RAYLENS_STUDY_URL": node.db_url("optuna"),
        "HF_HUB_CACHE": str(node.shared / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(node.shared / "hf" / "datasets"),
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": f"http://{node.head_ip}:{MLFLOW_PORT}",
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
    }
    path = node.dir / "node.env"
    write_env_file(path, values, "written by `raylens cluster setup-node`; sourced by ~/.bashrc")
    return path


# --- the head's services --------------------------------------------------------------------

def _postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries (``/usr/lib/postgresql/<version>/bin``), newest."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise ClusterError("PostgreSQL is not installed on the head: apt-get install postgresql")
    return found[-1].parent


def process_state(pid: int) -> str:
    """The state letter Linux reports for ``pid`` (``R``, ``S``, ``Z`` for a zombie, ...); the
    command name before it may hold spaces and parentheses, so it is cut at the last ``)``."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _pidfile_alive(pidfile: Path) -> int | None:
    """The pid ``pidfile`` names while that process runs (a zombie, dead but not yet reaped by
    its parent, counts as ended: signals no longer reach it)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return None if process_state(pid) == "Z" else pid
    except (OSError, ValueError, IndexError):
        return None


def stop_pidfile(pidfile: Path, timeout: float = 30.0) -> bool:
    """SIGTERM the process ``pidfile`` names (and wait for it); whether one was running."""
    pid = _pidfile_alive(pidfile)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pidfile_alive(pidfile):
            time.sleep(0.2)
        if _pidfile_alive(pidfile):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return pid is not None


_RUN_ENTRY_POINT = ("import sys; from importlib.metadata import entry_points; "
                    "(ep,) = entry_points(group='console_scripts', name=sys.argv[1]); "
                    "sys.argv = sys.argv[1:]; sys.exit(ep.load()())")
"""Run an installed console script by name with this interpreter (a venv that reuses the node
image's packages has no script of its own for them)."""


def _start_detached(argv: list[str], log: Path, pidfile: Path, env: dict[str, str]) -> int:
    stop_pidfile(pidfile)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


def start_postgres(node: Node, password: str) -> None:
    """PostgreSQL as the SSH user, data in ``~/raylens-pg``, listening on 127.0.0.1 only, password
    authentication; the databases raylens uses; ``~/.pgpass`` for the clients on this node."""
    pg = _postgres_bin()
    data = node.home / "raylens-pg"
    if not (data / "PG_VERSION").exists():
        with tempfile.NamedTemporaryFile("w", dir=node.dir, delete=False) as pw:
            pw.write(password + "\n")
        try:
            subprocess.run([str(pg / "initdb"), "-D", str(data), "-U", DB_USER,
                            "--auth=scram-sha-256", f"--pwfile={pw.name}", "-E", "UTF8"],
                           check=True, capture_output=True, text=True)
        finally:
            os.unlink(pw.name)
    _write_private(node.home / ".pgpass", f"127.0.0.1:{node.db_port}:*:{DB_USER}:{password}\n")
    status = subprocess.run([str(pg / "pg_ctl"), "-D", str(data), "status"], capture_output=True)
    if status.returncode != 0:
        options = (f"-c listen_addresses=127.0.0.1 -c port={node.db_port} "
                   f"-c unix_socket_directories={data}")
        started = subprocess.run([str(pg / "pg_ctl"), "-D", str(data), "-l",
                                  str(data / "server.log"), "-o", options, "-w", "start"],
                                 capture_output=True, text=True)
        if started.returncode != 0:
            raise ClusterError(f"PostgreSQL did not start: {started.stdout}{started.stderr} "
                               f"(log: {data / 'server.log'})")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=node.db_port, user=DB_USER, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        have = {row[0] for row in cur.fetchall()}
        for name in DATABASES:
            if name not in have:
                cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def _wait_http(url: str, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (an auth challenge counts)
        except OSError:
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise ClusterError(f"{what} did not answer at {url} within {timeout:g} s; "
                                   f"log {log}:\n{tail}")
            time.sleep(1)


def start_services(node: Node, *, timeout: float = 180.0) -> dict[str, int]:
    """On the head: PostgreSQL, then MLflow (basic-auth app, runs and users in PostgreSQL,
    artifacts on the shared folder, on the head's cluster address) and the Optuna dashboard (on
    127.0.0.1: reach it through SSH). Restarts the two servers from their pidfiles; returns their
    pids."""
    creds = load_secrets(node)
    start_postgres(node, creds["RAYLENS_DB_PASSWORD"])
    auth_ini = node.dir / "mlflow_auth.ini"
    _write_private(auth_ini, "\n".join([
        "[mlflow]", "default_permission = READ",
        f"database_uri = {node.db_url('mlflow_auth')}",
        f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    mlflow_env = {**env, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                  "MLFLOW_AUTH_ADMIN_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"]}
    artifacts = node.shared / "raylens" / "mlflow" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = node.dir / "mlflow.log"
    pids = {"mlflow": _start_detached(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--host", node.node_ip, "--port", str(MLFLOW_PORT), "--workers", "1",
         "--backend-store-uri", node.db_url("mlflow"),
         "--artifacts-destination", str(artifacts)],
        log, node.dir / "mlflow.pid", mlflow_env)}
    _wait_http(f"http://{node.node_ip}:{MLFLOW_PORT}/health", timeout, "MLflow", log)
    import optuna

    optuna.storages.RDBStorage(node.db_url("optuna"))  # the schema: the dashboard expects it
    dash_log = node.dir / "optuna-dashboard.log"
    pids["optuna-dashboard"] = _start_detached(
        [sys.executable, "-c", _RUN_ENTRY_POINT, "optuna-dashboard", node.db_url("optuna"),
         "--host", "127.0.0.1", "--port", str(DASHBOARD_PORT)],
        dash_log, node.dir / "optuna-dashboard.pid", env)
    _wait_http(f"http://127.0.0.1:{DASHBOARD_PORT}/", timeout, "the Optuna dashboard", dash_log)
    return pids


def stop_services(node: Node) -> list[str]:
    """Stop what ``start_services`` started (MLflow, the Optuna dashboard, PostgreSQL)."""
    stopped = [name for name in ("mlflow", "optuna-dashboard")
               if stop_pidfile(node.dir / f"{name}.pid")]
    data = node.home / "raylens-pg"
    if (data / "postmaster.pid").exists():
        subprocess.run([str(_postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                        "stop"], capture_output=True)
        stopped.append("postgresql")
    return stopped
