"""Run on the rehearsal's head (``ray exec``): what MLflow and the Optuna study hold for each
sweep named on the command line, as one JSON line (``--soak NAME``: the soak's records). Reads
the node's environment (``MLFLOW_TRACKING_URI`` and credentials, ``RAYLENS_STUDY_URL``,
``RAYLENS_STORAGE``)."""

import json
import os
import sys
from pathlib import Path

import mlflow
import optuna

import raylens  # noqa: F401  (offline Hugging Face environment)
from raylens.tracking import trial_rows


def sweep_records(name: str) -> dict:
    _, rows = trial_rows(mlflow.MlflowClient(), name)
    study = optuna.load_study(study_name=name,
                              storage=optuna.storages.RDBStorage(os.environ["RAYLENS_STUDY_URL"]))
    trials = Path(os.environ["RAYLENS_STORAGE"]) / name / "train"
    registered = 0
    for snapshot in trials.glob("*/checkpoint_manager_snapshot.json"):
        registered += len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
    return {
        "mlflow_trials": [r["trial_id"] for r in rows],
        "mlflow_status": {r["trial_id"]: r["status"] for r in rows},
        "mlflow_front": sorted(r["trial_id"] for r in rows if r["pareto"]),
        "optuna_trials": [t.user_attrs.get("tune_trial_id") for t in study.trials],
        "optuna_front": sorted(t.user_attrs["tune_trial_id"] for t in study.best_trials),
        "nodes": {r["trial_id"]: r["tags"].get("nodes", "").split(",") if r["tags"].get("nodes")
                  else [] for r in rows},
        "checkpoints_registered": registered,
        "study_storage": study._storage.__class__.__name__,
        "tracking_uri": mlflow.get_tracking_uri(),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--soak":  # the soak's records (tests/faultsoak.py), for its checks
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from faultsoak import records

        print("RECORDS=" + json.dumps({name: records(mlflow.MlflowClient(), optuna.load_study(
            study_name=name, storage=optuna.storages.RDBStorage(os.environ["RAYLENS_STUDY_URL"])),
            name) for name in sys.argv[2:]}))
    else:
        print("RECORDS=" + json.dumps({name: sweep_records(name) for name in sys.argv[1:]}))
