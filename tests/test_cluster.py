"""The node side of cluster.yaml (``raylens cluster ...``) without a cluster: secrets and the
node environment are owner-only and keep credentials out of every URL; an unfit node is refused
with every reason at once. The services and the launcher itself run in the cluster rehearsal
(``make test-cluster``)."""

import stat
import time

import pytest

from raylens import cluster
from raylens.config import ConfigError, SweepConfig, url_password
from raylens.recipes import recipe


def _node(tmp_path, node_ip="10.0.0.3", shared="shared") -> cluster.Node:
    """A node whose SSH user has the token and secrets cluster.yaml ships (head: 10.0.0.1)."""
    home = tmp_path / f"home-{node_ip}"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("token\n")
    token.chmod(0o600)
    cluster.make_secrets(home / ".raylens" / "cluster.env")
    return cluster.Node(home=home, shared=tmp_path / shared, node_ip=node_ip,
                        head_ip="10.0.0.1")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_owner_only_random_and_never_replaced(tmp_path):
    path = tmp_path / ".raylens" / "cluster.env"
    cluster.make_secrets(path)
    values = cluster.read_env_file(path)
    assert set(values) == set(cluster.SECRET_KEYS)
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert len(values["MLFLOW_TRACKING_PASSWORD"]) >= 24
    other = tmp_path / "other.env"
    cluster.make_secrets(other)
    assert cluster.read_env_file(other)["RAYLENS_DB_PASSWORD"] != values["RAYLENS_DB_PASSWORD"]
    with pytest.raises(cluster.ClusterError, match="exists"):
        cluster.make_secrets(path)
    assert cluster.read_env_file(path) == values


def test_node_env_points_every_node_at_the_head_without_a_credential_in_any_url(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("RAYLENS_NODE_GPUS", "0")  # this machine has no GPU
    (tmp_path / "shared").mkdir()
    cluster.setup_node(_node(tmp_path, "10.0.0.1"))  # the head first, as ray up does
    node = _node(tmp_path)
    env = cluster.read_env_file(cluster.setup_node(node))
    assert _mode(node.dir / "node.env") == 0o600
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"
    assert env["RAYLENS_NODE_IP"] == "10.0.0.3" and env["RAY_AUTH_MODE"] == "token"
    assert env["RAYLENS_STORAGE"] == str(tmp_path / "shared" / "raylens" / "runs")
    assert env["HF_HUB_CACHE"] == str(tmp_path / "shared" / "hf" / "hub")
    secrets = cluster.read_env_file(node.dir / "cluster.env")
    assert env["MLFLOW_TRACKING_PASSWORD"] == secrets["MLFLOW_TRACKING_PASSWORD"]
    for key, value in env.items():
        assert "://" not in value or url_password(value) is None, key
        assert secrets["RAYLENS_DB_PASSWORD"] not in value, key  # the database's stays on disk
    # the study URL the head's sweeps use is accepted by the sweep config (no password in it)
    sweep = SweepConfig(name="s", base=recipe("lora_adamw"),
                        space={"loss.retain_coef": ("log", 0.1, 10.0)},
                        study_url=env["RAYLENS_STUDY_URL"])
    assert sweep.study_url.startswith("postgresql+psycopg2://raylens@127.0.0.1")


def test_an_unfit_node_is_refused_with_every_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYLENS_NODE_GPUS", raising=False)  # a GPU node: this one has none
    node = _node(tmp_path)
    (node.home / ".ray" / "auth_token").chmod(0o644)
    (tmp_path / "shared").write_text("not a folder")
    with pytest.raises(cluster.ClusterError) as err:
        cluster.setup_node(node)
    message = str(err.value)
    assert "sees no GPU" in message and "driver >= 580" in message
    assert "auth_token is readable by others" in message
    assert "shared folder" in message
    assert not (node.dir / "node.env").exists()
    monkeypatch.setenv("RAYLENS_NODE_GPUS", "0")  # a CPU node: only the two others remain
    problems = cluster.check_node(node)
    assert len(problems) == 2 and not any("GPU" in p for p in problems)


def test_a_worker_without_the_heads_shared_folder_is_refused(tmp_path, monkeypatch):
    """The shared folder is never made by the check (a local folder would pass for it), and a
    worker must find the head's marker in it: a node that mounted nothing, or another file
    system, at RAYLENS_SHARED is refused before it runs a trial."""
    monkeypatch.setenv("RAYLENS_NODE_GPUS", "0")
    worker = _node(tmp_path)
    (problem,) = cluster.check_node(worker)
    assert "shared folder" in problem and "does not exist" in problem
    assert not worker.shared.exists()
    worker.shared.mkdir()
    (problem,) = cluster.check_node(worker)  # mounted, but not the head's (never set up there)
    assert f"{worker.head_marker} is missing" in problem and "10.0.0.1" in problem
    head = _node(tmp_path, "10.0.0.1")
    assert cluster.check_node(head) == []  # the head needs no marker: it writes it
    cluster.setup_node(head)
    assert cluster.check_node(worker) == []
    elsewhere = _node(tmp_path, "10.0.0.4", shared="other-shared")
    elsewhere.shared.mkdir()
    (elsewhere.head_marker.parent).mkdir(parents=True)
    elsewhere.head_marker.write_text("10.0.0.9\n")  # an old cluster's folder
    (problem,) = cluster.check_node(elsewhere)
    assert "names head 10.0.0.9" in problem


def test_a_nodes_address_is_where_the_launcher_reached_it(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.1 51000 10.0.0.3 22")
    monkeypatch.delenv("RAY_HEAD_IP", raising=False)
    node = cluster.Node.here()
    assert (node.node_ip, node.head_ip) == ("10.0.0.3", "10.0.0.3")  # the head itself
    monkeypatch.setenv("RAY_HEAD_IP", "10.0.0.1")  # a worker: Ray's autoscaler exports it
    assert cluster.Node.here().head_ip == "10.0.0.1"
    monkeypatch.delenv("SSH_CONNECTION")
    monkeypatch.delenv("RAYLENS_NODE_IP", raising=False)
    with pytest.raises(cluster.ClusterError, match="SSH_CONNECTION"):
        cluster.node_address()


def test_urls_with_passwords_are_refused_before_they_can_be_printed_or_pickled():
    base = recipe("lora_adamw")
    with pytest.raises(ConfigError, match=r"raylens:\*\*\*@db/optuna") as err:
        SweepConfig(name="s", base=base, space={"loss.retain_coef": ("log", 0.1, 10.0)},
                    study_url="postgresql://raylens:hunter2@db/optuna")
    assert "hunter2" not in str(err.value)
    from raylens.config import replace

    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as err:
        replace(base, {"tracking.tracking_uri": "http://me:hunter2@head:5000"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "-x", "a b", "x" * 101, ".hidden"])
def test_sweep_names_that_could_leave_the_storage_folder_are_refused(name):
    with pytest.raises(ConfigError, match="sweep.name"):
        SweepConfig(name=name, base=recipe("lora_adamw"),
                    space={"loss.retain_coef": ("log", 0.1, 10.0)})


def test_pidfile_stop_ends_only_the_process_it_names(tmp_path):
    import subprocess
    import sys

    pidfile = tmp_path / "x.pid"
    keep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfile.write_text(f"{proc.pid}\n")
    try:
        assert cluster.stop_pidfile(pidfile) is True
        assert proc.wait(timeout=10) == -15 and keep.poll() is None
        assert not pidfile.exists() and cluster.stop_pidfile(pidfile) is False
    finally:
        keep.kill()
        proc.kill()


def test_an_ended_process_not_yet_reaped_counts_as_stopped(tmp_path):
    """A service that exited but whose parent has not reaped it (a zombie) is no longer running:
    stopping it must not wait out the timeout (it used to: 30 s in the parent that started it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cluster.process_state(proc.pid) != "Z":
        time.sleep(0.05)
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{proc.pid}\n")
    try:
        assert cluster._pidfile_alive(pidfile) is None
    finally:
        proc.wait()
