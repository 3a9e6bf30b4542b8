"""raylens: Ray-orchestrated sweeps of tuned-lens unlearning.

Importing raylens makes the Hugging Face stack offline (hub, datasets, evaluate, download
counters) unless ``RAYLENS_ONLINE=1``: sweeps read pre-cached models and data, and a trial must
never stall on the network. Set before transformers/datasets are imported, so import raylens
first. MLflow's HTTP client gives up on an unreachable server after 3 retries of 20 s at most
(its defaults wait minutes per call), unless the environment says otherwise: a trial then keeps
its results for a later write (``raylens.search.sync_pending``) instead of stalling its workers.
"""

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
}

if os.environ.get("RAYLENS_ONLINE", "0") != "1":
    for _key, _value in OFFLINE_ENV.items():
        os.environ.setdefault(_key, _value)

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

__version__ = "0.1.0"
