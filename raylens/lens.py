"""Tuned lenses: load (hub id or folder), save, train, and the layer-index convention.

The lens object is ``tuned_lens.nn.TunedLens``. Convention (pinned by tests): translator ``l`` is
applied to ``hidden_states[l]``, the residual stream *entering* block ``l``
(``hidden_states[0]`` = embeddings); the final stream ``hidden_states[n_layers]`` needs no
translator. ``lens(h, l) = W_U . LN_f(h + A_l h + b_l)`` with a frozen copy of the model's final
norm and unembedding taken when the lens is built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tuned_lens.nn import LogitLens, TunedLens, TunedLensConfig
from tuned_lens.nn.unembed import Unembed

from raylens.config import ConfigError

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"


def lens_files(name_or_path: str, revision: str | None) -> tuple[Path, Path]:
    """Local paths of the lens files: a folder as is, otherwise downloaded from the hub."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = folder / CONFIG_FILE, folder / PARAMS_FILE
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(
                f"lens.name_or_path={name_or_path!r}: folder lacks {missing}; a tuned lens folder "
                f"holds {CONFIG_FILE} and {PARAMS_FILE}"
            )
        return files
    from huggingface_hub import hf_hub_download

    try:
        return tuple(  # type: ignore[return-value]
            Path(hf_hub_download(name_or_path, f, revision=revision))
            for f in (CONFIG_FILE, PARAMS_FILE)
        )
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise ConfigError(
            f"lens.name_or_path={name_or_path!r} is neither a folder with {CONFIG_FILE} and "
            f"{PARAMS_FILE} nor a reachable hub repository ({type(exc).__name__}: {exc})"
        ) from exc


def check_lens(name_or_path: str, revision: str | None, model_config):
    """The lens's config (and its params file) when it was made for a model of
    ``model_config``'s depth and width; ``ConfigError`` naming ``lens.name_or_path`` otherwise.
    Reads only the lens's JSON, so a run checks it before loading any weights."""
    config_path, params_path = lens_files(name_or_path, revision)
    try:
        config = TunedLensConfig.from_dict(json.loads(Path(config_path).read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"lens.name_or_path={name_or_path!r}: {CONFIG_FILE} is not a tuned "
                          f"lens config ({type(exc).__name__}: {exc})") from None
    n_layers, d_model = model_config.num_hidden_layers, model_config.hidden_size
    if config.num_hidden_layers != n_layers or config.d_model != d_model:
        raise ConfigError(
            f"lens.name_or_path={name_or_path!r} is invalid: it was made for "
            f"{config.num_hidden_layers} layers of width {config.d_model}; allowed a lens of "
            f"this model's {n_layers} layers of width {d_model}"
        )
    return config, params_path


def load_lens(model, name_or_path: str, revision: str | None = None) -> TunedLens:
    """Load a frozen tuned lens for ``model`` from a folder or hub id.

    Parameters are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling) and
    checked against the model: layer count, hidden size and translator shapes must match.
    """
    config, params_path = check_lens(name_or_path, revision, model.config)
    n_layers = model.config.num_hidden_layers
    state = torch.load(params_path, map_location="cpu", weights_only=True)
    lens = TunedLens(Unembed(model), config)
    expected = set(lens.layer_translators.state_dict())
    if set(state) != expected:
        raise ConfigError(
            f"lens.name_or_path={name_or_path!r}: {PARAMS_FILE} keys {sorted(state)[:6]}... do not "
            f"match the {n_layers} translators expected ({sorted(expected)[:6]}...)"
        )
    lens.layer_translators.load_state_dict(state)
    return lens.requires_grad_(False).eval()


def save_lens(lens: TunedLens, folder: Path, *, base_model_name_or_path: str) -> None:
    """Write ``params.pt`` and ``config.json`` in the tuned-lens format."""
    lens.config.base_model_name_or_path = base_model_name_or_path
    lens.save(folder, ckpt=PARAMS_FILE, config=CONFIG_FILE)


def _hidden_and_final(model, tokenizer, texts: list[str], max_length: int = 256):
    """Per-layer hidden states ``[n_layers, tokens, d]`` (real tokens only) and final log-probs."""
    hidden, final = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            out = model(**ids, output_hidden_states=True)
            hidden.append(torch.stack(out.hidden_states[:-1])[:, 0])
            final.append(out.logits[0].float().log_softmax(-1))
    return torch.cat(hidden, dim=1), torch.cat(final, dim=0)


def _kl(final_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(final || lens), in nats."""
    logq = logits.float().log_softmax(-1)
    return (final_logp.exp() * (final_logp - logq)).sum(-1).mean()


def train_lens(model, tokenizer, texts: list[str], *, steps: int = 300, lr: float = 3e-3,
               tokens_per_step: int = 2048, seed: int = 0, log=print) -> TunedLens:
    """Train a tuned lens for ``model``: each translator minimises KL(final || lens_l(h_l)) on
    ``texts``, starting from the logit lens (zero translators). Returns a frozen lens."""
    lens = TunedLens.from_model(model)
    hidden, final = _hidden_and_final(model, tokenizer, texts)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(lens.layer_translators.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    num_tokens = hidden.shape[1]
    for step in range(steps):
        idx = torch.randint(num_tokens, (min(tokens_per_step, num_tokens),), generator=gen)
        loss = sum(_kl(final[idx], lens(hidden[l, idx], l)) for l in range(len(lens)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  lens step {step:4d}/{steps} summed KL {loss.item():.4f}")
    return lens.requires_grad_(False).eval()


def lens_kl_report(model, lens: TunedLens, tokenizer, texts: list[str]) -> dict[str, list[float]]:
    """Per-layer mean KL(final || lens) of the tuned lens and of the plain logit lens on ``texts``."""
    hidden, final = _hidden_and_final(model, tokenizer, texts)
    logit_lens = LogitLens.from_model(model)
    with torch.no_grad():
        return {
            "tuned": [_kl(final, lens(hidden[l], l)).item() for l in range(len(lens))],
            "logit": [_kl(final, logit_lens(hidden[l], l)).item() for l in range(len(lens))],
        }


def split_for_report(texts: list[str], num_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle a copy of ``texts`` and hold out ``num_held_out`` for an unbiased KL report."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    return texts[num_held_out:], texts[:num_held_out]
