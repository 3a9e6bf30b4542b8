"""Forget and retain corpora (hub datasets, local JSONL or the toy world), tokenized and paired.

Forget example ``i`` is paired with retain example ``i``. Hub forget documents join
title/abstract/text with blank lines and are taken in order; the retain corpus is shuffled with
``retain_shuffle_seed`` first (the seed's recipe). Bad sources fail with a message naming the
field before any training starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raylens.config import TOY, ConfigError, DataConfig


def _read_jsonl(field: str, path: Path) -> list[str]:
    texts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"data.{field}={str(path)!r}: line {number} is not JSON "
                                  f"({exc.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(
                    f"data.{field}={str(path)!r}: line {number} has no non-empty 'text' field "
                    f"(keys: {sorted(row) if isinstance(row, dict) else type(row).__name__})"
                )
            texts.append(text)
    return texts


def _hub_texts(field: str, name: str, subset: str | None, columns: tuple[str, ...],
               shuffle_seed: int | None = None) -> list[str]:
    """The documents of a hub dataset's train split, columns joined by blank lines; with
    ``shuffle_seed``, in the order of ``Dataset.shuffle(seed=...)`` (the seed's retain order)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split="train")
    except Exception as exc:  # offline, gated or missing: one actionable message
        raise ConfigError(
            f"data.{field}={name!r} is neither a local JSONL file nor a loadable hub dataset "
            f"({type(exc).__name__}: {str(exc)[:300]}); pre-cache it or pass a JSONL path"
        ) from exc
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"data.{field}={name!r} lacks columns {missing}; it has {ds.column_names}")
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    return ["\n\n".join(str(row[c]) for c in columns if row[c]) for row in ds]


def load_texts(config: DataConfig, toyworld: Path | None = None) -> tuple[list[str], list[str]]:
    """The first ``num_examples`` forget and retain documents, paired by index."""
    sources = {}
    for field in ("forget", "retain"):
        source = getattr(config, field)
        if source == TOY:
            if toyworld is None:
                raise ConfigError(f"data.{field}='toy' needs a toy world")
            path = Path(toyworld) / "data" / f"{field}.jsonl"
            sources[field] = _read_jsonl(field, path)
        elif Path(source).is_file():
            sources[field] = _read_jsonl(field, Path(source))
        elif Path(source).suffix == ".jsonl":
            raise ConfigError(f"data.{field}={source!r}: no such file")
        elif field == "forget":
            sources[field] = _hub_texts(field, source, None, config.forget_fields)
        else:
            texts = _hub_texts(field, source, config.retain_subset, (config.retain_field,),
                               shuffle_seed=config.retain_shuffle_seed)
            sources[field] = [text for text in texts if text.strip()]
    for field, texts in sources.items():
        if len(texts) < config.num_examples:
            raise ConfigError(
                f"data.num_examples={config.num_examples} is invalid: allowed at most "
                f"{len(texts)}, the documents in data.{field}={getattr(config, field)!r}"
            )
    n = config.num_examples
    return sources["forget"][:n], sources["retain"][:n]


@dataclass
class Batch:
    """Right-padded token ids and their real-token mask (1 = real)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        """The batch on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``; empty results are an error."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ConfigError(f"data: documents {empty[:5]} tokenize to nothing")
    return ids


def collate(sequences: list[list[int]], pad_id: int) -> Batch:
    """Right-pad ``sequences`` to the longest with ``pad_id``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(ids, mask)


def epoch_order(size: int, epoch: int, seed: int) -> list[int]:
    """A permutation of ``range(size)`` for ``epoch``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(size, generator=gen).tolist()


@dataclass
class PairedData:
    """Tokenized forget/retain pairs and the order in which they are visited."""

    forget: list[list[int]]
    retain: list[list[int]]
    pad_id: int

    def __post_init__(self) -> None:
        assert len(self.forget) == len(self.retain), "forget and retain are paired by index"

    def __len__(self) -> int:
        return len(self.forget)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """A permutation of the pairs for ``epoch``, reproducible from ``seed``."""
        return epoch_order(len(self), epoch, seed)

    def batch(self, indices: list[int]) -> tuple[Batch, Batch]:
        """Forget and retain batches of the pairs at ``indices``."""
        return (collate([self.forget[i] for i in indices], self.pad_id),
                collate([self.retain[i] for i in indices], self.pad_id))


def load_paired(config: DataConfig, tokenizer, toyworld: Path | None = None) -> PairedData:
    """Load, truncate and tokenize the forget/retain pairs of ``config``."""
    forget, retain = load_texts(config, toyworld)
    return PairedData(tokenize(tokenizer, forget, config.max_length),
                      tokenize(tokenizer, retain, config.max_length), tokenizer.pad_token_id)


@dataclass
class TextData:
    """Tokenized documents of one corpus (a fine-tuning attack's) and their visiting order."""

    texts: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.texts)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """A permutation of the documents for ``epoch``, reproducible from ``seed``."""
        return epoch_order(len(self), epoch, seed)

    def batch(self, indices: list[int]) -> tuple[Batch]:
        """The batch of the documents at ``indices`` (a 1-tuple, as ``PairedData`` gives 2)."""
        return (collate([self.texts[i] for i in indices], self.pad_id),)


def load_corpus(config: DataConfig, corpus: str, tokenizer,
                toyworld: Path | None = None) -> TextData:
    """The first ``num_examples`` documents of ``config``'s ``forget`` or ``retain`` corpus,
    truncated and tokenized."""
    forget, retain = load_texts(config, toyworld)
    texts = forget if corpus == "forget" else retain
    return TextData(tokenize(tokenizer, texts, config.max_length), tokenizer.pad_token_id)
