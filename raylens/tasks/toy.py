"""Dataset loaders for the toy lm-eval tasks (``custom_dataset`` in the YAMLs beside this file)."""

from __future__ import annotations

from pathlib import Path


def _load(task: str, toyworld: str | None = None, **_metadata):
    import datasets

    from raylens import toyworld as tw

    world = tw.ToyWorld(Path(toyworld)) if toyworld else tw.load_or_build()
    path = world.eval_set(task)
    if not path.exists():
        raise FileNotFoundError(f"{task}: no questions at {path}; is {world.root} a toy world?")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(tw.read_jsonl(path))})


def load_toy_wmdp(**metadata):
    """The toy hazard questions as a DatasetDict with a ``test`` split."""
    return _load("toy_wmdp", **metadata)


def load_toy_mmlu(**metadata):
    """The toy general-knowledge questions as a DatasetDict with a ``test`` split."""
    return _load("toy_mmlu", **metadata)
