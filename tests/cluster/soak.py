"""The fault soak on the rehearsal cluster: the soak's toy sweep (``tests/faultsoak.py``: 30
trials, the short attack suite on each, a space that reaches divergence, collapse and an
evaluation limit too short to finish) submitted with ``ray submit`` to the head and two worker
nodes that ``tests/cluster/rehearse.py`` builds, with faults a seed picks injected as an
operator would meet them on a real cluster:

- ``kill_worker``: a Ray Train worker process on a worker node SIGKILLed;
- ``kill_driver``: the sweep's driver on the head SIGKILLed, and the same ``ray submit`` run
  again (Tune resumes the experiment from the shared storage, Optuna the study in PostgreSQL);
- ``mlflow_down``: the head's MLflow server stopped (``ray exec``, its pidfile) for 20-60 s,
  then ``raylens cluster start-services`` as the operator's restart;
- ``postgres_restart``: the head's PostgreSQL restarted (``pg_ctl restart``).

A Hugging Face token is planted as a canary in every node's environment; the MLflow password,
the database password and MLflow's session key are the cluster's own secrets. At the end every
trial is once in MLflow (PostgreSQL) and once in the Optuna study with its status and reason,
trials ran on both worker nodes, the fronts agree, and no secret is in any file the sweep, the
servers or Ray wrote (the files made to hold one, ``~/.raylens/*.env``, ``~/.pgpass`` and
MLflow's auth config, are not searched).

    make test-cluster-soak                            # as root; about an hour on 2 cores
    python tests/cluster/soak.py --trials 4 --seed 7  # a short one
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the soak's shared parts

from faultsoak import (  # noqa: E402
    HF_CANARY,
    KINDS,
    SWEEP_FILE,
    check,
    leaks,
    plan,
    run_with_faults,
)
from rehearse import NODES, USER, WORKERS, Rehearsal, log, on_fresh_machine, run  # noqa: E402

from raylens.cluster import read_env_file  # noqa: E402

HEAD = "python -c {!r}"
STOP_MLFLOW = ("from raylens.cluster import Node, stop_pidfile; "
               "print('stopped' if stop_pidfile(Node.here().dir / 'mlflow.pid') else 'none')")
RESTART_POSTGRES = ("$(ls -d /usr/lib/postgresql/*/bin | tail -1)/pg_ctl -D ~/raylens-pg -m fast "
                    "-w -l ~/raylens-pg/server.log restart")
CREDENTIAL_FILES = ("cluster.env", "node.env", ".pgpass", "mlflow_auth.ini", "auth_token",
                    ".bashrc")
"""Files made to hold a credential, not searched for leaks: the secrets and the token
``cluster.yaml`` ships (chmod 600), what ``setup-node`` derives from them, and the ``~/.bashrc``
where the admin put the user's Hugging Face token."""


def _skip(path: Path) -> bool:
    """Not searched for leaks: the credential files, and the synced source (which holds the
    canary's definition)."""
    return path.name in CREDENTIAL_FILES or "raylens-src" in path.parts


class ClusterSoak(Rehearsal):
    """The rehearsal's machine (nodes, network, clean clone, ``ray up``) with a soak instead
    of the rehearsal's sweeps."""

    def soak(self, trials: int, seed: int) -> dict:
        from raylens import toyworld as tw

        figures: dict = {"trials": trials, "seed": seed}
        start = time.monotonic()
        self.prepare_host()
        self.build_image()
        self.build_network()
        self.build_nodes()
        world = tw.load_or_build(log=log)  # the host's cached world, shared as a cache is
        cache = self.root / "shared" / "cache"
        shutil.copytree(world.root, cache / "toyworld" / world.root.name)
        run(["chown", "-R", f"{USER}:{USER}", str(self.root / "shared")])
        for node in ("head", *WORKERS):  # the admin's part: the cache and the user's HF token
            with open(self.home(node) / ".bashrc", "a") as f:
                f.write(f"export RAYLENS_CACHE=/shared/cache HF_TOKEN={HF_CANARY}\n")
        cluster = self.prepare_laptop()
        (self.root / "clone" / "soak.py").write_text(SWEEP_FILE.format(trials=trials, seed=seed))
        self.laptop(["ray", "up", "-y", "--no-config-cache", str(cluster)], log_name="ray-up.log")
        self.wait_for_nodes(cluster, 3)
        figures["ray_up_s"] = round(time.monotonic() - start, 1)
        log(f"machine prepared and 3 nodes alive in {figures['ray_up_s']} s; the soak starts")

        rng = random.Random(seed)
        faults = plan(rng, span=25.0 * trials)  # 2 trials at once take about 30 s a trial here
        count = iter(range(100))

        def start_driver():
            return self.laptop(["ray", "submit", str(cluster), "soak.py", "--", "--toy"],
                               background=True, log_name=f"driver-{next(count)}.log")

        drivers: list = []
        injected, took = run_with_faults(
            drivers, start_driver, faults,
            lambda event, drivers: self.inject(event, drivers, rng, cluster, start_driver),
            finished=lambda driver: driver.returncode == 0,
            log_to=self.root / "faults.jsonl")
        figures.update(soak_s=round(took), faults=injected, drivers=len(drivers))
        assert {e["kind"] for e in injected} >= set(KINDS), injected  # every kind, once at least
        if drivers[-1].returncode != 0:
            raise AssertionError("the sweep did not finish: " + (
                self.root / f"driver-{len(drivers) - 1}.log").read_text()[-4000:])

        done = self.laptop(["ray", "exec", str(cluster),
                            "python ~/raylens-src/tests/cluster/records.py --soak soak"],
                           log_name="records.log")
        line = next(x for x in done.stdout.splitlines() if x.startswith("RECORDS="))
        found = json.loads(line[len("RECORDS="):])["soak"]
        figures["statuses"] = check(found, trials)
        figures["front"] = found["tagged_front"]
        figures["resumed_from_checkpoint"] = sum(1 for r in found["rows"]
                                                 if (r["resumed_from"] or 0) > 0)
        figures["driver_crashed_in_optuna"] = found["optuna_driver_crashed"]
        nodes = {n for r in found["rows"] for n in r["nodes"].split(",") if n}
        figures["trial_nodes"] = sorted(nodes)
        assert nodes == {NODES[w] for w in WORKERS}, nodes  # trials ran on both workers
        pending = list((self.root / "shared").rglob("mlflow_pending.json"))
        assert not pending, pending

        self.laptop(["ray", "down", "-y", str(cluster)], log_name="ray-down.log")
        secrets = {"HF_TOKEN": HF_CANARY, **{
            k: v for k, v in read_env_file(self.node_dir("laptop") / ".raylens" / "cluster.env")
            .items() if k.endswith(("PASSWORD", "SECRET_KEY"))}}
        places = [self.root / "shared", *(self.node_dir(n) for n in ("head", *WORKERS))]
        searched, leaked = leaks(places, secrets, _skip)
        token = (self.node_dir("laptop") / ".ray" / "auth_token").read_text().strip()
        _, ray_token = leaks(places, {"ray token": token}, _skip)
        figures["leak_search"] = {"files": searched, "secrets": sorted(secrets), "found": leaked,
                                  "ray_token_in": ray_token}  # Ray's own files: reported
        assert searched > 100 and not leaked, leaked[:10]
        figures["total_s"] = round(time.monotonic() - start, 1)
        return figures

    def inject(self, event: dict, drivers: list, rng, cluster: Path, start_driver) -> bool:
        """Inject one fault on the cluster; False when there was nothing to hit."""
        import psutil

        kind = event["kind"]
        if kind in ("kill_worker", "kill_driver"):
            found = []
            for proc in psutil.process_iter(["cmdline"]):
                argv = proc.info["cmdline"] or []
                if kind == "kill_worker" and any("RayTrainWorker" in a for a in argv):
                    found.append(proc.pid)
                elif kind == "kill_driver" and len(argv) > 1 and argv[1].endswith("soak.py") \
                        and "--toy" in argv:  # the head's driver, not the laptop's ray submit
                    found.append(proc.pid)
            if not found:
                return False
            event["pid"] = rng.choice(found)
            os.kill(event["pid"], signal.SIGKILL)
            if kind == "kill_driver":
                drivers[-1].wait(120)  # the laptop's ray submit ends with its driver
                time.sleep(5)
                drivers.append(start_driver())
        elif kind == "mlflow_down":
            stopped = self.laptop(["ray", "exec", str(cluster), HEAD.format(STOP_MLFLOW)],
                                  check=False)
            event["stopped"] = "stopped" in stopped.stdout
            event["down_s"] = rng.randint(20, 60)
            time.sleep(event["down_s"])
            self.laptop(["ray", "exec", str(cluster), "raylens cluster start-services"])
        else:
            self.laptop(["ray", "exec", str(cluster), RESTART_POSTGRES])
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026, help="picks the faults and their times")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs) afterwards")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    return on_fresh_machine(ClusterSoak, "cluster soak", lambda m: m.soak(args.trials, args.seed),
                            keep=args.keep, json_out=args.json)


if __name__ == "__main__":
    sys.exit(main())
