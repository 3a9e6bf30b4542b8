"""Dataset loader of the ``wmdp_bio_robust`` subtasks (``custom_dataset`` in their YAMLs)."""

from __future__ import annotations

from pathlib import Path

HUB_ID = "EleutherAI/wmdp_bio_robust_mcqa"


def load_wmdp_bio_robust(name: str, data_dir: str | None = None, **_metadata):
    """Category ``name`` of WMDP-Bio-Robust, from ``<data_dir>/EleutherAI/wmdp_bio_robust_mcqa``
    (a local snapshot: one dataset config per category, each with a ``robust`` split) when
    ``data_dir`` is given, else from the hub id (offline: its local cache)."""
    import datasets

    source = HUB_ID
    if data_dir:
        source = str(Path(data_dir) / HUB_ID)
        if not Path(source).is_dir():
            raise FileNotFoundError(f"wmdp_bio_robust: no local snapshot at {source}")
    return datasets.load_dataset(source, name)
