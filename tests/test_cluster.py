"""The node side of cluster.yaml (``raylens cluster ...``) without a cluster: secrets and the
node environment are owner-only and keep credentials out of every URL; an unfit node is refused
with every reason at once. The services and the launcher itself run in the cluster rehearsal
(``make test-cluster``)."""

import stat

import pytest

from raylens import cluster
from raylens.config import ConfigError, SweepConfig, recipe, url_password


def _node(tmp_path, **env) -> cluster.Node:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("token\n")
    token.chmod(0o600)
    cluster.make_secrets(home / ".raylens" / "cluster.env")
    return cluster.Node(home=home, shared=tmp_path / "shared", node_ip="10.0.0.3",
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
