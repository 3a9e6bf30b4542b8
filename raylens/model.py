"""Models: load (hub id, folder or toy), LoRA, the frozen reference, export to HF folders.

The reference is what the retain loss compares against: with LoRA, the same model with its
adapter disabled (no second copy in memory); with full fine-tuning, a frozen copy in the compute
dtype (bf16 on the real model: a 4-bit reference added a noise floor of ~48 in the seed runs).

Precision policy (``model.dtype`` is the *compute* dtype):

- full fine-tuning: the trained weights and the optimizer state are fp32 (master weights), so an
  update below half a bf16 ulp is kept rather than rounded away; forward passes run in
  ``model.dtype`` (FSDP2's mixed-precision policy when sharded, gradients reduced in fp32;
  ``torch.autocast`` in one unsharded process); the frozen reference is held in ``model.dtype``;
- LoRA: the frozen base is held in ``model.dtype``, the adapter in fp32 (PEFT's default);
- the export is written in the source checkpoint's dtype.
"""

from __future__ import annotations

import contextlib
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


def checkpoint_dtype(model_config) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in (its config's ``dtype``), fp32 when
    the config does not say."""
    value = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def load_model(config: ModelConfig, toyworld: Path | None = None, *,
               dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` with the weights in ``dtype`` (default ``model.dtype``); see
    ``load_tokenizer``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(config, toyworld)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config, toyworld),
                                                     revision=config.revision,
                                                     dtype=dtype or DTYPES[config.dtype])
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
    target modules unless ``mode.lora_target_modules`` names others; ``("all-linear",)`` is
    PEFT's every linear layer but the output head, on every layer)."""
    from peft import LoraConfig, get_peft_model

    modules = list(mode.lora_target_modules) if mode.lora_target_modules else None
    every_linear = modules == ["all-linear"]  # PEFT takes it as a string, on every layer
    lora = LoraConfig(
        r=mode.lora_rank,
        lora_alpha=mode.lora_alpha,
        lora_dropout=mode.lora_dropout,
        bias="none",
        target_modules="all-linear" if every_linear else modules,
        layers_to_transform=None if every_linear else list(range(max(target_layers) + 1)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if gradient_checkpointing:  # checkpointed blocks need inputs that require grad
        peft_model.enable_input_require_grads()
    return peft_model


def master_dtype(mode: str, config: ModelConfig) -> torch.dtype:
    """The dtype the weights are loaded in: fp32 master weights for full fine-tuning, the compute
    dtype for LoRA's frozen base."""
    return torch.float32 if mode == "full" else DTYPES[config.dtype]


def compute_context(model_config: ModelConfig, mode: str, device, *, sharded: bool):
    """Where forward passes of the trained model run: autocast to ``model.dtype`` for unsharded
    full fine-tuning (fp32 weights); nothing otherwise (LoRA's base already is in it, FSDP2
    casts the parameters itself)."""
    dtype = DTYPES[model_config.dtype]
    if mode != "full" or sharded or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Reference:
    """Frozen outputs of the original model for the retain loss."""

    def __init__(self, model, mode: str, dtype: torch.dtype | None = None, *, frozen=None):
        self.mode = mode
        if mode == "lora":
            self.model = model  # the adapter is switched off around each call
        elif frozen is not None:  # built already (sharded, see ``load_sharded``)
            self.model = frozen
        else:  # a copy in the compute dtype, never trained
            self.model = copy.deepcopy(model).to(dtype or next(model.parameters()).dtype)
            self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 logits: bool = True):
        """The original model's outputs (hidden states included) on a batch, without grad;
        without ``logits``, those of the last position only (the output head's cost spared)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=0 if logits else 1)
        if self.mode == "lora":
            with self.model.disable_adapter():
                return self.model(**kwargs)
        return self.model(**kwargs)


def export(model, tokenizer, out: Path, mode: str, dtype: torch.dtype | None = None):
    """Write the trained model where ``from_pretrained`` loads it; ``(model folder, live model)``.

    LoRA: ``out/adapter`` (PEFT) and ``out/model`` (merged); full: ``out/model``. The LoRA model
    is merged in place and the merged model returned, so it and the folder hold the same weights.
    ``dtype``: the weights are cast to it first (the source checkpoint's)."""
    out = Path(out)
    if mode == "lora":
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model", model


def shard_fsdp2(model, *, compute: torch.dtype = torch.float32) -> None:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every transformer block, then on
    the root. Parameters become ``Shard(0)`` DTensors, which Muon orthogonalises as whole
    matrices. Forward and backward run in ``compute``; gradients are reduced in fp32 and kept in
    the parameters' dtype (fp32 master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from tuned_lens.model_surgery import get_transformer_layers

    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
        if compute != torch.float32 else MixedPrecisionPolicy()
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


def load_sharded(config: ModelConfig, toyworld: Path | None = None, *, device,
                 with_reference: bool = True):
    """Full fine-tuning under FSDP2 without a full copy on every rank:
    ``(model, reference, head)``.

    Every rank builds the model (fp32 master weights) and the reference (``model.dtype``) on the
    meta device and shards them; rank 0 alone reads the checkpoint, in the dtype it is stored
    in, and ``set_model_state_dict`` broadcasts it tensor by tensor in each target's dtype, each
    rank keeping its shard. So a rank holds its shards plus one tensor in flight; rank 0 also
    holds the checkpoint and, while the fp32 model loads, an fp32 copy of it. ``head`` is a
    meta-device model whose final norm and unembedding hold full weights: what a tuned lens
    copies (``load_lens(head, ...)``). ``with_reference=False`` (an attack) builds no
    reference and returns None in its place."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM
    from tuned_lens.model_surgery import get_final_norm

    from raylens.collectives import broadcast_from_rank0

    compute = DTYPES[config.dtype]
    hf_config = load_model_config(config, toyworld)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        reference = AutoModelForCausalLM.from_config(hf_config, dtype=compute)
        head = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    full: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        source, _ = load_model(config, toyworld, dtype=checkpoint_dtype(hf_config))
        full = source.state_dict()
        buffers = dict(source.named_buffers())
    # buffers (rotary frequencies) are in no state dict and not sharded: sent as they are
    live_buffers = {}
    for name, b in model.named_buffers():
        value = buffers[name].float() if name in buffers else torch.empty(b.shape)
        live_buffers[name] = broadcast_from_rank0(value.contiguous())
    # the head's final norm and unembedding, in full on every rank, for the lens
    for module in (get_final_norm(head), head.get_output_embeddings()):
        module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in head.named_parameters():
            if param.device.type != "meta":
                value = full[name].float() if full else torch.empty(param.shape)
                param.copy_(broadcast_from_rank0(value.contiguous()))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    targets = ((model, torch.float32), (reference, compute))[:2 if with_reference else 1]
    for target, dtype in targets:
        shard_fsdp2(target, compute=compute)
        target.to_empty(device=device)
        # rank 0 sends each tensor in the target's dtype (for the fp32 model a converted
        # copy of the checkpoint: a cost on rank 0 only)
        set_model_state_dict(target, {k: v.to(dtype) for k, v in full.items()},
                             options=options)
        for name, b in target.named_buffers():
            b.copy_(live_buffers[name].to(b.dtype))
    del full, buffers
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if not with_reference:
        return model, None, head
    reference.requires_grad_(False).eval()
    return model, reference, head
