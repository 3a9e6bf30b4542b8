"""Security on one machine: no loading path unpickles what it did not write (a planted pickle
that would run a command is refused and runs nothing); the servers raylens starts locally bind
127.0.0.1; Ray's own ports, which bind every interface, refuse a client without the cluster's
token. On the cluster, MLflow's password and the SSH-only dashboards are checked by the
rehearsal (``tests/cluster/rehearse.py``, ``check_doors``); the canary that no secret reaches a
file is in ``test_soak.py``."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickling this runs ``touch <path>``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"layer_translators.0.weight": _Payload(marker)}, path)


def test_a_planted_pickle_in_a_lens_or_checkpoint_is_refused_and_runs_nothing(world, tmp_path):
    """A lens whose params.pt carries a pickle that runs a command, and a checkpoint whose RNG
    file does: both loads fail (``torch.load(weights_only=True)``) and the command never ran."""
    import pickle

    from raylens.config import ModelConfig
    from raylens.lens import load_lens
    from raylens.model import load_model

    marker = tmp_path / "ran"
    lens = tmp_path / "lens"
    shutil.copytree(world.root / "lens", lens)
    _plant(lens / "params.pt", marker)
    model, _ = load_model(ModelConfig(name_or_path=str(world.model)))
    with pytest.raises(pickle.UnpicklingError):
        load_lens(model, str(lens))
    rng = tmp_path / "rng_rank0.pt"
    _plant(rng, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(rng, weights_only=True)  # what read_checkpoint calls
    assert "weights_only=True" in Path(
        sys.modules["raylens.checkpoint"].__file__).read_text()
    assert not marker.exists()


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
            if c.status == "LISTEN" and c.pid in pids}


def _tree(pid: int) -> set[int]:
    import psutil

    proc = psutil.Process(pid)
    return {proc.pid, *(c.pid for c in proc.children(recursive=True))}


@pytest.mark.faults
def test_the_mlflow_ui_binds_loopback_only(tmp_path):
    """``raylens ui``: every socket its server processes listen on is on 127.0.0.1."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'raylens-mlflow.db'}").search_experiments()  # a store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "raylens.cli", "ui", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (("127.0.0.1", port) not in
                                               _listening(_tree(proc.pid))):
            time.sleep(0.5)
        sockets = _listening(_tree(proc.pid))
        assert ("127.0.0.1", port) in sockets
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    finally:
        os.killpg(proc.pid, 9)


@pytest.mark.faults
def test_the_local_ray_dashboard_binds_loopback_and_ray_refuses_a_client_without_the_token(
        tmp_path):
    """A sweep's local Ray instance (``connect_ray``): the dashboard listens on 127.0.0.1 only;
    Ray's token mode is on, and a client without the token (another HOME) is refused."""
    import ray

    from raylens.ray_train import connect_ray

    connect_ray(driver_slots=1)
    try:
        gcs = ray.get_runtime_context().gcs_address
        import psutil

        dashboard = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                     if c.status == "LISTEN" and c.laddr.port == 8265}
        assert dashboard == {("127.0.0.1", 8265)}, dashboard
        home = tmp_path / "stranger"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(home), RAY_AUTH_MODE="token")
        probe = ("import ray, sys\n"
                 f"ray.init(address={gcs!r})\n"
                 "print('JOINED', ray.cluster_resources())\n")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=120, cwd=home)
        assert "JOINED" not in out.stdout, out.stdout
        assert out.returncode != 0
        assert "token" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-2000:]
    finally:
        ray.shutdown()
