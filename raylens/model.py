"""Models: load (hub id, folder or toy), LoRA, the frozen reference, export to HF folders.

The reference is what the retain loss compares against: with LoRA, the same model with its
adapter disabled (no second copy in memory); with full fine-tuning, a frozen copy in the training
dtype (bf16 on the real model: a 4-bit reference added a noise floor of ~48 in the seed log).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from raylens.config import TOY, ConfigError, ModeConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(config: ModelConfig, toyworld: Path | None) -> str:
    """``toy`` becomes the toy world's main model folder; anything else is passed through."""
    if config.name_or_path == TOY:
        if toyworld is None:
            raise ConfigError("model.name_or_path='toy' needs a toy world")
        return str(Path(toyworld) / "model")
    return config.name_or_path


def _not_found(config: ModelConfig, exc: Exception) -> ConfigError:
    return ConfigError(
        f"model.name_or_path={config.name_or_path!r} is neither a model folder nor a cached hub "
        f"model ({str(exc)[:300]})"
    )


def load_model_config(config: ModelConfig, toyworld: Path | None = None):
    """The Hugging Face config of the model (no weights): enough to check shapes early."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(config, toyworld),
                                          revision=config.revision)
    except OSError as exc:
        raise _not_found(config, exc) from exc


def load_tokenizer(config: ModelConfig, toyworld: Path | None = None):
    """The model's tokenizer, padding on the right with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config, toyworld),
                                                  revision=config.revision)
    except OSError as exc:
        raise _not_found(config, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(config: ModelConfig, toyworld: Path | None = None):
    """``(model, tokenizer)``; see ``load_tokenizer``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(config, toyworld)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config, toyworld),
                                                     revision=config.revision,
                                                     dtype=DTYPES[config.dtype])
    except OSError as exc:
        raise _not_found(config, exc) from exc
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer


def default_target_layers(num_layers: int) -> tuple[int, ...]:
    """Every ``num_layers // 6``-th layer from that step on: 5, 10, ..., 30 of 32; 1..5 of 6."""
    step = max(1, num_layers // 6)
    return tuple(range(step, num_layers, step))


def resolve_target_layers(layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """``loss.target_layers`` (or the default) checked against the model: each must index a
    translator of the lens, ``0 <= l < num_layers``."""
    layers = layers or default_target_layers(num_layers)
    bad = [l for l in layers if l >= num_layers]
    if bad:
        raise ConfigError(
            f"loss.target_layers={layers} is invalid: allowed layers 0..{num_layers - 1} of this "
            f"{num_layers}-layer model"
        )
    return layers


def apply_lora(model, mode: ModeConfig, target_layers: tuple[int, ...], *,
               gradient_checkpointing: bool = False):
    """Wrap ``model`` with a LoRA adapter on layers ``0..max(target_layers)`` (PEFT's default
    target modules unless ``mode.lora_target_modules`` names others)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=mode.lora_rank,
        lora_alpha=mode.lora_alpha,
        lora_dropout=mode.lora_dropout,
        bias="none",
        target_modules=list(mode.lora_target_modules) if mode.lora_target_modules else None,
        layers_to_transform=list(range(max(target_layers) + 1)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if gradient_checkpointing:  # checkpointed blocks need inputs that require grad
        peft_model.enable_input_require_grads()
    return peft_model


class Reference:
    """Frozen outputs of the original model for the retain loss."""

    def __init__(self, model, mode: str):
        self.mode = mode
        if mode == "lora":
            self.model = model  # the adapter is switched off around each call
        else:
            self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        if self.mode == "lora":
            with self.model.disable_adapter():
                return self.model(**kwargs)
        return self.model(**kwargs)


def export(model, tokenizer, out: Path, mode: str):
    """Write the trained model where ``from_pretrained`` loads it; ``(model folder, live model)``.

    LoRA: ``out/adapter`` (PEFT) and ``out/model`` (merged); full: ``out/model``. The LoRA model
    is merged in place and the merged model returned, so it and the folder hold the same weights."""
    out = Path(out)
    if mode == "lora":
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model", model


def shard_fsdp2(model, *, bf16: bool = False) -> None:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every transformer block, then on
    the root. Parameters become ``Shard(0)`` DTensors, which Muon orthogonalises as whole
    matrices. ``bf16``: compute in bf16 and reduce gradients in fp32 (GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from tuned_lens.model_surgery import get_transformer_layers

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    _, blocks = get_transformer_layers(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def gather_full_state_dict(model) -> dict:
    """The unsharded state dict, gathered to CPU; call on every rank, rank 0 receives it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
