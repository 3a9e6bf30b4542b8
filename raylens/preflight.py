"""Before a sweep spends a GPU-hour: is everything it names in the local cache? And, on a node
with internet access, fetch exactly that.

``preflight`` validates the whole config (``train.validate``: the model's config and tokenizer,
its shape against the target layers, the forget and retain corpora, every evaluation task's
questions) and then checks the two things ``validate`` does not read: the model's weight files
and the tuned lens. Every sweep runs it on its driver before the first trial, so a missing
asset is one clear error instead of trials failing one at a time. ``prefetch`` downloads the
same assets through the same loading code (run it with ``RAYLENS_ONLINE=1``; the CLI sets it).
"""

from __future__ import annotations

import json
from pathlib import Path

from raylens.config import ConfigError, UnlearnConfig
from raylens.lens import CONFIG_FILE, PARAMS_FILE, lens_files
from raylens.model import resolve_model_path
from raylens.train import lens_source, validate

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*",
                   "*.txt", "*.model")
"""The files of a model repository raylens reads (no other formats, no READMEs)."""


def _missing_weight_files(folder: Path) -> list[str]:
    """Which weight files a model folder lacks: the shards its index names, else
    ``model.safetensors`` (or ``pytorch_model.bin``)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [s for s in shards if not (folder / s).exists()]
    if list(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").exists():
        return []
    return ["model.safetensors"]


def model_folder(config: UnlearnConfig, toyworld: Path | None = None, *,
                 download: bool = False) -> Path:
    """The local folder of the model's files: a folder as given, else the hub cache's snapshot
    (downloaded first with ``download``). ``ConfigError`` naming the model when it is absent."""
    name = resolve_model_path(config.model, toyworld)
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=config.model.revision,
                                      allow_patterns=list(WEIGHT_PATTERNS),
                                      local_files_only=not download))
    except Exception as exc:  # the hub client raises many types; one message for the user
        raise ConfigError(
            f"model.name_or_path={name!r} is not in the Hugging Face cache "
            f"({type(exc).__name__}): run `raylens prefetch` for this sweep on a node with "
            "internet access, or point HF_HUB_CACHE at the cache that holds it") from exc


def preflight(config: UnlearnConfig, toyworld: Path | None = None) -> list[str]:
    """Check that a run of ``config`` can start here without the network; returns what was
    checked (one line each). Raises ``ConfigError`` naming the first field whose asset is bad or
    missing, or the MLflow server that does not answer."""
    layers = validate(config, toyworld)
    folder = model_folder(config, toyworld)
    missing = _missing_weight_files(folder)
    if missing:
        raise ConfigError(
            f"model.name_or_path={config.model.name_or_path!r}: its weights are not all in "
            f"{folder} (missing {missing[:4]}{' ...' if len(missing) > 4 else ''}): run "
            "`raylens prefetch` for this sweep")
    lens = lens_source(config, toyworld)
    lens_files(lens, config.lens.revision)  # ConfigError naming lens.name_or_path
    tracked = []
    if config.tracking.enabled:
        from raylens.tracking import check_reachable, resolve_uri

        tracked = [check_reachable(resolve_uri(config.tracking))]
    return [*tracked, f"model {config.model.name_or_path}: config, tokenizer, weights in {folder}",
            f"lens {lens}: {CONFIG_FILE}, {PARAMS_FILE}",
            f"corpora: forget {config.data.forget}, retain {config.data.retain}",
            f"eval tasks: {', '.join(config.eval.tasks)}",
            f"target layers {list(layers)}"]


def prefetch(config: UnlearnConfig, toyworld: Path | None = None) -> list[str]:
    """Download what ``preflight`` checks (needs the network: ``RAYLENS_ONLINE=1`` before
    raylens is imported); then run ``preflight`` offline-equivalent to confirm."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError("prefetch needs the network: run it with RAYLENS_ONLINE=1 (the "
                          "`raylens prefetch` command does) and without HF_HUB_OFFLINE=1")
    model_folder(config, toyworld, download=True)
    lens = lens_source(config, toyworld)
    lens_files(lens, config.lens.revision)  # hf_hub_download fetches the two files
    return preflight(config, toyworld)  # loads (and so caches) corpora and eval datasets
