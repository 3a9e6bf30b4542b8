"""The cluster rehearsal: ``ray up``, ``ray submit``, a detached ``ray job submit`` and ``ray
down`` of the shipped ``cluster.yaml``, on a head and two worker nodes made on this machine.

Run as root (``make test-cluster``). Each node is a Linux network namespace with its own
address on a bridge that lives in a namespace of its own, its own sshd (Debian's
``openssh-server``), and a mount namespace in which the cluster's SSH user has a home of its
own, ``/tmp`` is the node's own and ``/shared`` is one folder bind-mounted on every node. A
fourth namespace, the "laptop", runs the launcher from a clean clone of this repository. All
traffic stays inside these namespaces; everything is removed at the end, also after a failure.

The nodes' image carries Python and raylens's dependencies, as a GPU image carries torch: this
checkout's installed packages (hard links, read-only, without raylens itself) in the node's
``/usr/local``, so ``cluster.yaml``'s ``pip install`` of torch and raylens finds them (pip is
pointed at a local folder holding setuptools only; the nodes have no internet). The node
preparation an admin would do is the SSH user, its key in ``authorized_keys`` and, in its
``~/.bashrc``, ``RAYLENS_NODE_GPUS=0`` (CPU nodes) and ``RAYLENS_RAY_START_ARGS`` (the head
offers no CPUs, so trials run on the workers). The cluster file is the shipped one with its
``provider`` and ``auth`` sections replaced, nothing else.

Checks (each failure names what it saw): trials of the real ``sweeps/sft_muon.py`` ran on the
worker nodes (their addresses are in MLflow), every trial is once in MLflow (PostgreSQL) and in
the Optuna study and the fronts agree; MLflow refuses a request without credentials and
answers one with them; the Ray and Optuna dashboards answer through the SSH tunnel only; the
detached sweep finishes although the SSH session that submitted it was killed mid-sweep; the
shared folder holds no checkpoint of a finished trial.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path

from raylens.cluster import read_env_file

REPO = Path(__file__).resolve().parents[2]
PREFIX = "rlc"
USER = "rlcluster"
SUBNET = "10.77.0"
NODES = {"head": f"{SUBNET}.1", "w1": f"{SUBNET}.2", "w2": f"{SUBNET}.3",
         "laptop": f"{SUBNET}.100"}
WORKERS = ("w1", "w2")
SWEEP = "sft_muon"
TRIALS = 2
SWEEP_SCALE = ["--trials", str(TRIALS), "--set", "scaling.use_gpu=false",
               "--set", "scaling.num_workers=1", "--set", "data.num_examples=32",
               "--set", "batch.global_batch=16", "--set", "batch.per_device_batch=16",
               "--set", "data.max_length=64", "--set", "scaling.checkpoint_every=1",
               "--set", "sweep.retain_floor=0"]
"""The real sft_muon sweep at rehearsal scale: 2 trials of 2 steps, a checkpoint per step."""


INIT = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    if pid == child.pid:
        sys.exit(os.waitstatus_to_exitcode(status))
"""
"""PID 1 of a node: starts sshd and reaps every orphan (Ray's daemons are reparented to it)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(argv, *, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))[:300]} exited {done.returncode}:\n"
                           f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


class Rehearsal:
    def __init__(self, root: Path, keep: bool = False):
        self.root = root
        self.keep = keep
        self.created_user = False
        self.made_dirs: list[Path] = []
        self.daemons: list[subprocess.Popen] = []

    # --- the machine ------------------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        return self.root / node

    def home(self, node: str) -> Path:
        return self.node_dir(node) / "home"

    def mounts(self, node: str) -> list[tuple[Path, str, bool]]:
        """(source, mount point, read-only) for a node's mount namespace, in order."""
        if node == "laptop":
            # its own /tmp (Ray's launcher keeps state there), with this checkout's venv seen
            # where it is even when that is under /tmp (a CI clone may be): the host's /tmp is
            # bound aside first, the venv bound back from there
            host_tmp = self.node_dir(node) / "host-tmp"
            binds = [(Path("/tmp"), str(host_tmp), True),
                     (self.node_dir(node) / "tmp", "/tmp", False)]
            venv = Path(sys.executable).absolute().parent.parent  # unresolved: python is a link
            if venv.is_relative_to("/tmp"):
                (self.node_dir(node) / "tmp" / venv.relative_to("/tmp")).mkdir(
                    parents=True, exist_ok=True)
                binds.append((host_tmp / venv.relative_to("/tmp"), str(venv), True))
            return binds
        return [(self.home(node), f"/home/{USER}", False),
                (self.root / "shared", "/shared", False),
                (self.root / "image" / "dist-packages", "/usr/local/lib/python3.11/dist-packages",
                 True),
                (self.root / "image" / "bin", "/usr/local/bin", True),
                (self.node_dir(node) / "tmp", "/tmp", False)]

    def in_node(self, node: str, command: str) -> list[str]:
        """argv running ``command`` (shell) in ``node``'s network and mount namespaces; a
        node (not the laptop) also gets its own process namespace, so ``ray stop`` on one node
        (it kills Ray processes by name) cannot reach another's."""
        binds = " && ".join(
            f"mount --bind {src} {dst}" + (f" && mount -o remount,ro,bind {dst}" if ro else "")
            for src, dst, ro in self.mounts(node))
        own_pids = [] if node == "laptop" else ["--pid", "--fork", "--mount-proc"]
        return ["ip", "netns", "exec", f"{PREFIX}-{node}", "unshare", "--mount",
                "--propagation", "private", *own_pids, "sh", "-c", f"{binds} && {command}"]

    def prepare_host(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("the cluster rehearsal needs root (network namespaces, sshd)")
        for tool in ("sshd", "rsync", "ssh", "ip", "unshare"):
            if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
                raise SystemExit(f"{tool} is missing: apt-get install openssh-server rsync "
                                 "iproute2 util-linux")
        if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
            raise SystemExit("PostgreSQL is missing: apt-get install postgresql")
        if run(["id", USER], check=False).returncode != 0:
            run(["useradd", "-M", "-d", f"/home/{USER}", "-s", "/bin/bash", USER])
            self.created_user = True
        run(["usermod", "-p", "*", USER])  # no password, but not locked: key login works
        for point in (Path(f"/home/{USER}"), Path("/shared"), Path("/run/sshd")):
            if not point.exists():
                point.mkdir(parents=True)
                self.made_dirs.append(point)

    def build_image(self) -> None:
        """The nodes' /usr/local: this checkout's site-packages (hard links) minus raylens, and
        its console scripts started by whichever python3 is first on PATH."""
        venv = Path(sys.executable).parent.parent
        site = next(venv.glob("lib/python3*/site-packages"))
        image = self.root / "image"
        image.mkdir()
        if run(["cp", "-al", str(site), str(image / "dist-packages")], check=False).returncode:
            shutil.rmtree(image / "dist-packages", ignore_errors=True)  # another file system:
            run(["cp", "-a", str(site), str(image / "dist-packages")])  # copy (slower)
        for path in (image / "dist-packages").iterdir():
            if "raylens" in path.name:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        (image / "bin").mkdir()
        for script in (venv / "bin").iterdir():
            if not script.is_file() or script.name.startswith(("python", "pip", "activate")):
                continue
            try:
                first, rest = script.read_text().split("\n", 1)
            except (UnicodeDecodeError, ValueError):
                continue
            if first.startswith("#!") and "python" in first and script.name != "raylens":
                target = image / "bin" / script.name
                target.write_text("#!/usr/bin/env python3\n" + rest)
                target.chmod(0o755)
        wheels = self.root / "shared" / "wheels"
        run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
             "setuptools>=68", "wheel"])

    def build_network(self) -> None:
        net = f"{PREFIX}-net"
        run(["ip", "netns", "add", net])
        run(["ip", "netns", "exec", net, "ip", "link", "add", "br0", "type", "bridge"])
        run(["ip", "netns", "exec", net, "ip", "link", "set", "br0", "up"])
        for node, address in NODES.items():
            ns = f"{PREFIX}-{node}"
            run(["ip", "netns", "add", ns])
            run(["ip", "link", "add", f"{ns}-a", "type", "veth", "peer", "name", f"{ns}-b"])
            run(["ip", "link", "set", f"{ns}-a", "netns", net])
            run(["ip", "link", "set", f"{ns}-b", "netns", ns])
            run(["ip", "netns", "exec", net, "ip", "link", "set", f"{ns}-a", "master", "br0",
                 "up"])
            for cmd in (["ip", "link", "set", f"{ns}-b", "name", "eth0"],
                        ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"],
                        # a default route onto the bridge (which leads nowhere): Ray finds a
                        # node's own address by opening a UDP socket towards a public one
                        ["ip", "route", "add", "default", "dev", "eth0"]):
                run(["ip", "netns", "exec", ns, *cmd])

    def build_nodes(self) -> None:
        laptop = self.node_dir("laptop")
        (laptop / ".ssh").mkdir(parents=True)
        (laptop / "tmp").mkdir()
        os.chmod(laptop / "tmp", 0o1777)  # mkdir's mode is masked by the umask
        (laptop / "host-tmp").mkdir()
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "raylens-rehearsal",
             "-f", str(laptop / ".ssh" / "raylens_cluster")])
        public = (laptop / ".ssh" / "raylens_cluster.pub").read_text()
        for node in ("head", *WORKERS):
            home, etc = self.home(node), self.node_dir(node) / "etc"
            for folder in (home / ".ssh", home / ".config" / "pip", etc):
                folder.mkdir(parents=True)
            (self.node_dir(node) / "tmp").mkdir()
            os.chmod(self.node_dir(node) / "tmp", 0o1777)
            (home / ".ssh" / "authorized_keys").write_text(public)
            (home / ".config" / "pip" / "pip.conf").write_text(
                "[global]\nno-index = true\nfind-links = /shared/wheels\n")
            start_args = "--num-cpus=0" if node == "head" else "--num-cpus=2"
            (home / ".bashrc").write_text(
                "# node preparation (the admin's part): CPU-only nodes\n"
                f"export RAYLENS_NODE_GPUS=0 RAYLENS_RAY_START_ARGS='{start_args}'\n")
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")])
            (etc / "sshd_config").write_text("\n".join([
                "Port 22", f"ListenAddress {NODES[node]}", f"HostKey {etc / 'host_key'}",
                f"PidFile {etc / 'sshd.pid'}", "AuthorizedKeysFile .ssh/authorized_keys",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                "PermitRootLogin no", f"AllowUsers {USER}", "AllowTcpForwarding yes",
                "X11Forwarding no", "MaxStartups 100:30:200", "MaxSessions 100", ""]))
            run(["chown", "-R", f"{USER}:{USER}", str(home)])
            os.chmod(home / ".ssh", 0o700)
            shared = self.root / "shared"
            run(["chown", f"{USER}:{USER}", str(shared)])
            # the node's init: sshd under a process that reaps what daemons leave behind
            init = f"exec /usr/bin/python3 -c {_quote(INIT)} /usr/sbin/sshd -D -e -f " \
                   f"{etc / 'sshd_config'}"
            self.daemons.append(subprocess.Popen(
                self.in_node(node, init),
                stdout=open(self.node_dir(node) / "sshd.log", "w"), stderr=subprocess.STDOUT))
        for node in ("head", *WORKERS):
            self.wait_port(NODES[node], 22)

    def wait_port(self, host: str, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.laptop_connects(host, port) is not True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host}:{port} does not answer from the laptop")
            time.sleep(0.5)

    # --- the laptop -------------------------------------------------------------------------
    def laptop_env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {"HOME": str(self.node_dir("laptop")), "PATH": f"{venv_bin}:/usr/sbin:/usr/bin:/bin",
               "LANG": "C.UTF-8", "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
               # as the README says: Ray 2.60's autoscaler v2 brought up only the first worker
               # of this local-provider cluster; v1 brings up both
               "RAY_UP_enable_autoscaler_v2": "0"}
        return env

    def laptop(self, argv: list[str], *, check=True, timeout=1200, background=False,
               log_name: str | None = None):
        """Run ``argv`` on the laptop, in the clone."""
        command = " ".join(_quote(a) for a in argv)
        full = self.in_node("laptop", f"cd {self.root / 'clone'} && exec {command}")
        if background:
            out = open(self.root / (log_name or "laptop.log"), "w")
            return subprocess.Popen(full, env=self.laptop_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        if log_name:  # written as it runs, so a long command can be watched
            with open(self.root / log_name, "w") as out:
                proc = subprocess.run(full, env=self.laptop_env(), stdout=out,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
            text = (self.root / log_name).read_text()
            done = subprocess.CompletedProcess(full, proc.returncode, text, "")
        else:
            done = subprocess.run(full, env=self.laptop_env(), capture_output=True, text=True,
                                  timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"laptop: {command[:300]} exited {done.returncode}:\n"
                               f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}")
        return done

    def laptop_connects(self, host: str, port: int) -> bool | str:
        probe = ("import socket,sys; s=socket.socket(); s.settimeout(3)\n"
                 "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
                 "except OSError as e: print(type(e).__name__)")
        done = run(["ip", "netns", "exec", f"{PREFIX}-laptop", sys.executable, "-c", probe,
                    host, str(port)], check=False)
        return True if done.stdout.strip() == "open" else done.stdout.strip()

    def laptop_http(self, url: str, auth: tuple[str, str] | None = None) -> int:
        """HTTP status of a GET from the laptop (0: no connection)."""
        header = ""
        if auth:
            header = "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        probe = ("import sys, urllib.request, urllib.error\n"
                 "r = urllib.request.Request(sys.argv[1])\n"
                 "if sys.argv[2]: r.add_header('Authorization', sys.argv[2])\n"
                 "try:\n print(urllib.request.urlopen(r, timeout=10).status)\n"
                 "except urllib.error.HTTPError as e: print(e.code)\n"
                 "except OSError: print(0)")
        done = run(["ip", "netns", "exec", f"{PREFIX}-laptop", sys.executable, "-c", probe,
                    url, header], check=False)
        return int(done.stdout.strip() or 0)

    def prepare_laptop(self) -> Path:
        """A clean clone, the cluster file with only provider and auth changed, the token and
        the secrets made as the README says."""
        clone = self.root / "clone"
        run(["git", "clone", "-q", str(REPO), str(clone)])
        # this checkout's uncommitted changes too: the rehearsal tests the working tree
        changed = run(["git", "ls-files", "-m", "-o", "--exclude-standard", "-z"],
                      cwd=REPO).stdout.split("\0")
        for name in filter(None, changed):
            source = REPO / name
            if source.is_file():
                (clone / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, clone / name)
        for name in filter(None, run(["git", "ls-files", "-d", "-z"], cwd=REPO).stdout
                           .split("\0")):
            (clone / name).unlink(missing_ok=True)
        import yaml

        config = yaml.safe_load((REPO / "cluster.yaml").read_text())
        config["provider"] = {"type": "local", "head_ip": NODES["head"],
                              "worker_ips": [NODES[w] for w in WORKERS]}
        # an absolute key path: ssh expands "~" from the passwd entry, not from $HOME
        config["auth"] = {"ssh_user": USER, "ssh_private_key":
                          str(self.node_dir("laptop") / ".ssh" / "raylens_cluster")}
        path = self.node_dir("laptop") / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.laptop(["ray", "get-auth-token", "--generate"])
        self.laptop([sys.executable, "-m", "raylens.cli", "cluster", "secrets"])
        return path

    # --- the rehearsal ----------------------------------------------------------------------
    def rehearse(self, rehearsal_cache: Path | None) -> dict:
        figures = {}
        start = time.monotonic()
        self.prepare_host()
        self.build_image()
        self.build_network()
        self.build_nodes()
        hf = self.root / "shared" / "hf"
        if rehearsal_cache:
            shutil.copytree(rehearsal_cache, hf, symlinks=True)
        else:
            run([sys.executable, "-m", "raylens.cli", "rehearsal", "build", str(hf)],
                timeout=1200)
        run(["chown", "-R", f"{USER}:{USER}", str(self.root / "shared")])
        cluster = self.prepare_laptop()
        figures["prepare_s"] = round(time.monotonic() - start, 1)
        log(f"machine prepared in {figures['prepare_s']} s; ray up")

        t = time.monotonic()
        self.laptop(["ray", "up", "-y", "--no-config-cache", str(cluster)], log_name="ray-up.log")
        self.wait_for_nodes(cluster, 3)
        figures["ray_up_s"] = round(time.monotonic() - t, 1)
        log(f"ray up and 3 nodes alive in {figures['ray_up_s']} s")
        self.check_doors(cluster, figures)

        t = time.monotonic()
        self.laptop(["ray", "submit", str(cluster), "sweeps/sft_muon.py", "--", *SWEEP_SCALE],
                    log_name="ray-submit.log", timeout=2400)
        figures["ray_submit_s"] = round(time.monotonic() - t, 1)
        log(f"ray submit finished in {figures['ray_submit_s']} s")

        t = time.monotonic()
        self.detached(cluster, figures)
        figures["detached_s"] = round(time.monotonic() - t, 1)

        self.check_records(cluster, figures)
        self.laptop(["ray", "down", "-y", str(cluster)], log_name="ray-down.log")
        figures["total_s"] = round(time.monotonic() - start, 1)
        return figures

    def tunnel(self, cluster: Path, name: str, forwards: list[str] | None = None):
        """An SSH session from the laptop to the head: ``ray dashboard`` (port 8265), or plain
        ``ssh -N -L ...`` with the cluster key for other ports."""
        if forwards is None:
            proc = self.laptop(["ray", "dashboard", str(cluster)], background=True,
                               log_name=f"{name}.log")
            port = 8265
        else:
            key = self.node_dir("laptop") / ".ssh" / "raylens_cluster"
            argv = ["ssh", "-N", "-i", str(key), "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes"]
            for forward in forwards:
                argv += ["-L", forward]
            proc = self.laptop([*argv, f"{USER}@{NODES['head']}"], background=True,
                               log_name=f"{name}.log")
            port = int(forwards[0].split(":")[0])
        deadline = time.monotonic() + 60
        while self.laptop_connects("127.0.0.1", port) is not True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tunnel {name} did not open: "
                                   f"{(self.root / (name + '.log')).read_text()[-2000:]}")
            time.sleep(0.5)
        return proc

    @staticmethod
    def close(proc) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def check_doors(self, cluster: Path, figures: dict) -> None:
        """MLflow needs credentials; the Ray and Optuna dashboards answer through SSH only."""
        head = NODES["head"]
        creds = read_env_file(self.node_dir("laptop") / ".raylens" / "cluster.env")
        user_pw = (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
        url = f"http://{head}:5000/api/2.0/mlflow/experiments/search?max_results=5"
        doors = {"mlflow_without_credentials": self.laptop_http(url),
                 "mlflow_wrong_password": self.laptop_http(url, (user_pw[0], "wrong")),
                 "mlflow_with_credentials": self.laptop_http(url, user_pw),
                 "ray_dashboard_on_cluster_address": self.laptop_connects(head, 8265),
                 "optuna_dashboard_on_cluster_address": self.laptop_connects(head, 8080)}
        dash = self.tunnel(cluster, "ray-dashboard-check")
        doors["ray_dashboard_through_tunnel"] = self.laptop_http("http://127.0.0.1:8265/")
        self.close(dash)
        optuna = self.tunnel(cluster, "optuna-tunnel", ["8080:127.0.0.1:8080"])
        doors["optuna_dashboard_through_tunnel"] = self.laptop_http("http://127.0.0.1:8080/")
        self.close(optuna)
        figures["doors"] = doors
        log(f"doors: {doors}")
        expected = {"mlflow_without_credentials": 401, "mlflow_wrong_password": 401,
                    "mlflow_with_credentials": 200, "ray_dashboard_through_tunnel": 200,
                    "optuna_dashboard_through_tunnel": 200}
        wrong = {k: v for k, v in expected.items() if doors[k] != v}
        for key in ("ray_dashboard_on_cluster_address", "optuna_dashboard_on_cluster_address"):
            if doors[key] is True:
                wrong[key] = "open"
        if wrong:
            raise AssertionError(f"doors not as expected: {wrong} (all: {doors})")

    def detached(self, cluster: Path, figures: dict) -> None:
        """The same sweep (another name) through ``ray job submit`` over ``ray dashboard``'s
        tunnel; that SSH session is killed once a trial runs; the job must still succeed."""
        name = f"{SWEEP}_detached"
        dash = self.tunnel(cluster, "ray-dashboard-submit")
        job = "raylens-rehearsal-detached"
        self.laptop(["ray", "job", "submit", "--address", "http://127.0.0.1:8265",
                     "--working-dir", "sweeps", "--submission-id", job, "--no-wait", "--",
                     "python", "sft_muon.py", *SWEEP_SCALE, "--set", f"sweep.name={name}"],
                    log_name="job-submit.log")
        trials = self.root / "shared" / "raylens" / "runs" / name / "trials"
        deadline = time.monotonic() + 900
        while not (trials.is_dir() and any(trials.iterdir())):
            if time.monotonic() > deadline:
                raise RuntimeError("the detached sweep started no trial within 15 min")
            time.sleep(2)
        self.close(dash)  # the SSH session that submitted the job dies mid-sweep
        figures["killed_submit_session_with_trials_started"] = len(list(trials.iterdir()))
        log("detached sweep running; its SSH session killed")
        time.sleep(20)
        deadline = time.monotonic() + 2400
        while True:
            dash = self.tunnel(cluster, "ray-dashboard-status")
            status = self.laptop(["ray", "job", "status", "--address", "http://127.0.0.1:8265",
                                  job], check=False).stdout.lower()
            # the CLI prints "Job '<id>' succeeded" (or failed, or was stopped) once it ended
            ended = [word for word in ("succeeded", "failed", "stopped")
                     if f"job '{job}' {word}" in status or f"job '{job}' was {word}" in status]
            if ended:
                logs = self.laptop(["ray", "job", "logs", "--address", "http://127.0.0.1:8265",
                                    job], check=False, log_name="job.log").stdout
                self.close(dash)
                break
            self.close(dash)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the detached sweep did not end: {status[-1000:]}")
            time.sleep(20)
        if ended != ["succeeded"]:
            raise AssertionError(f"the detached sweep ended {ended}:\n{logs[-4000:]}")
        log("detached sweep SUCCEEDED")

    def check_records(self, cluster: Path, figures: dict) -> None:
        """On the head: MLflow (PostgreSQL) and the Optuna study hold every trial once, with
        the workers' addresses, and agree on the front; no finished trial kept a checkpoint."""
        names = [SWEEP, f"{SWEEP}_detached"]
        done = self.laptop(["ray", "exec", str(cluster),
                            "python ~/raylens-src/tests/cluster/records.py " + " ".join(names)],
                           log_name="records.log")
        line = next(l for l in done.stdout.splitlines() if l.startswith("RECORDS="))
        records = json.loads(line[len("RECORDS="):])
        figures["records"] = records
        workers = {NODES[w] for w in WORKERS}
        problems = []
        for name in names:
            r = records[name]
            if sorted(r["mlflow_trials"]) != sorted(r["optuna_trials"]) or \
                    len(r["mlflow_trials"]) != TRIALS:
                problems.append(f"{name}: MLflow trials {r['mlflow_trials']} vs Optuna "
                                f"{r['optuna_trials']} (want {TRIALS} each, once)")
            if sorted(r["mlflow_front"]) != sorted(r["optuna_front"]):
                problems.append(f"{name}: fronts differ: {r['mlflow_front']} vs "
                                f"{r['optuna_front']}")
            off = {t: n for t, n in r["nodes"].items() if not n or set(n) - workers}
            if off:
                problems.append(f"{name}: trials not on the worker nodes: {off}")
            if not r["checkpoints_registered"]:
                problems.append(f"{name}: no trial registered a checkpoint (the check of their "
                                "deletion would be empty)")
        left = sorted(str(p.relative_to(self.root / "shared"))  # Ray Train's checkpoint folders
                      for p in (self.root / "shared" / "raylens").rglob("checkpoint_*")
                      if p.is_dir())
        figures["checkpoints_left"] = left
        if left:
            problems.append(f"checkpoints of finished trials left on /shared: {left}")
        if problems:
            raise AssertionError("; ".join(problems))
        log(f"records agree: {json.dumps(records)}")

    def wait_for_nodes(self, cluster: Path, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        check = ("import ray; ray.init(address='auto', log_to_driver=False); "
                 "print('ALIVE=%d' % sum(1 for n in ray.nodes() if n['Alive']))")
        while True:
            done = self.laptop(["ray", "exec", str(cluster), f"python -c {_quote(check)}"],
                               check=False, timeout=180)
            if f"ALIVE={count}" in done.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} nodes: {done.stdout[-2000:]}"
                                   f"{done.stderr[-2000:]}")
            time.sleep(10)

    # --- clean-up ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        for node in NODES:
            ns = f"{PREFIX}-{node}"
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in self.daemons:
            proc.kill()
        time.sleep(1)
        for node in [*NODES, "net"]:
            run(["ip", "netns", "del", f"{PREFIX}-{node}"], check=False)
        if self.created_user:
            run(["userdel", USER], check=False)
        for point in reversed(self.made_dirs):
            try:
                point.rmdir()
            except OSError:
                pass
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def leftovers() -> list[str]:
    """Namespaces an earlier, killed rehearsal left (removed before starting again)."""
    names = run(["ip", "netns", "list"], check=False).stdout.split()
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearsal-cache", default=None,
                        help="an existing `raylens rehearsal build` folder to copy (else built)")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs) afterwards")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    cache = Path(args.rehearsal_cache) if args.rehearsal_cache else None
    return on_fresh_machine(Rehearsal, "cluster rehearsal", lambda r: r.rehearse(cache),
                            keep=args.keep, json_out=args.json)


def on_fresh_machine(kind, what: str, body, *, keep: bool, json_out: str | None) -> int:
    """Build a ``kind`` (``Rehearsal`` or a subclass) in a new folder, after removing the
    namespaces a killed earlier run left; ``body(machine)`` returns its figures, printed (and
    written to ``json_out``); the machine is removed afterwards, also after a failure."""
    for name in leftovers():
        run(["ip", "netns", "del", name], check=False)
    root = Path(tempfile.mkdtemp(prefix="raylens-cluster-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    machine = kind(root, keep=keep)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        figures = body(machine)
    except BaseException:
        log(f"{what} FAILED; logs in {root}" + ("" if keep else " (removed: --keep)"))
        raise
    finally:
        machine.cleanup()
    print(json.dumps(figures, indent=1))
    if json_out:
        Path(json_out).write_text(json.dumps(figures, indent=1))
    log(f"{what} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
