"""Config validation names the field; flat dicts round-trip without loss."""

import pytest

from raylens.config import (
    BatchConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LensConfig,
    LossConfig,
    ModeConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    ToyWorldConfig,
    TrackingConfig,
    UnlearnConfig,
    from_flat,
    replace,
    to_flat,
)

MALFORMED = [
    (lambda: ModelConfig(name_or_path=""), "model.name_or_path"),
    (lambda: ModelConfig(dtype="fp8"), "model.dtype"),
    (lambda: ModelConfig(gradient_checkpointing="yes"), "model.gradient_checkpointing"),
    (lambda: LensConfig(name_or_path="  "), "lens.name_or_path"),
    (lambda: DataConfig(num_examples=0), "data.num_examples"),
    (lambda: DataConfig(max_length=-5), "data.max_length"),
    (lambda: DataConfig(forget_fields=()), "data.forget_fields"),
    (lambda: DataConfig(retain_shuffle_seed=1.5), "data.retain_shuffle_seed"),
    (lambda: LossConfig(target_layers=(5, 5)), "loss.target_layers"),
    (lambda: LossConfig(target_layers=(-1,)), "loss.target_layers"),
    (lambda: LossConfig(retain_coef=-1.0), "loss.retain_coef"),
    (lambda: LossConfig(retain_coef=0.0, remove_coef=0.0), "loss.remove_coef"),
    (lambda: LossConfig(retain_start=1.5), "loss.retain_start"),
    (lambda: LossConfig(ramp_fraction=0.0), "loss.ramp_fraction"),
    (lambda: LossConfig(retain_loss="cosine"), "loss.retain_loss"),
    (lambda: OptimConfig(name="sgd"), "optim.name"),
    (lambda: OptimConfig(lr=0.0), "optim.lr"),
    (lambda: OptimConfig(muon_lr=float("nan")), "optim.muon_lr"),
    (lambda: OptimConfig(adam_betas=(0.9, 1.0)), "optim.adam_betas"),
    (lambda: OptimConfig(adam_betas=(0.9,)), "optim.adam_betas"),
    (lambda: OptimConfig(muon_adjust_lr="rms"), "optim.muon_adjust_lr"),
    (lambda: OptimConfig(warmup_ratio=1.0), "optim.warmup_ratio"),
    (lambda: OptimConfig(weight_decay=-0.1), "optim.weight_decay"),
    (lambda: ModeConfig(kind="qlora"), "mode.kind"),
    (lambda: ModeConfig(lora_rank=0), "mode.lora_rank"),
    (lambda: ModeConfig(lora_dropout=1.0), "mode.lora_dropout"),
    (lambda: ModeConfig(lora_target_modules=()), "mode.lora_target_modules"),
    (lambda: BatchConfig(per_device_batch=True), "batch.per_device_batch"),
    (lambda: ScalingConfig(num_workers=0), "scaling.num_workers"),
    (lambda: ScalingConfig(use_gpu="yes"), "scaling.use_gpu"),
    (lambda: ScalingConfig(checkpoint_every=-1), "scaling.checkpoint_every"),
    (lambda: EvalConfig(subset=0.0), "eval.subset"),
    (lambda: EvalConfig(subset=1.5), "eval.subset"),
    (lambda: EvalConfig(subset_seed="a"), "eval.subset_seed"),
    (lambda: EvalConfig(data_dir=""), "eval.data_dir"),
    (lambda: ScalingConfig(checkpoint_every=2.5), "scaling.checkpoint_every"),
    (lambda: ScalingConfig(keep_checkpoints=0), "scaling.keep_checkpoints"),
    (lambda: ScalingConfig(max_failures=-2), "scaling.max_failures"),
    (lambda: EvalConfig(tasks=("toy_wmdp", "hellaswag")), "eval.tasks"),
    (lambda: EvalConfig(time_limit_s=0), "eval.time_limit_s"),
    (lambda: TrackingConfig(experiment=""), "tracking.experiment"),
    (lambda: UnlearnConfig(mode=ModeConfig(kind="lora"), optim=OptimConfig(name="muon")), "optim.name"),
    (lambda: UnlearnConfig(batch=BatchConfig(global_batch=30, per_device_batch=8)), "batch.global_batch"),
    (lambda: UnlearnConfig(batch=BatchConfig(global_batch=32, per_device_batch=8),
                           scaling=ScalingConfig(num_workers=3)), "batch.global_batch"),
    (lambda: UnlearnConfig(data=DataConfig(num_examples=16)), "data.num_examples"),
    (lambda: ToyWorldConfig(hidden_size=100, num_heads=3), "toyworld.hidden_size"),
    (lambda: ToyWorldConfig(num_entities=3), "toyworld.num_entities"),
    (lambda: from_flat(UnlearnConfig, {"loss.retain_coeff": 5}), "loss.retain_coeff"),
    (lambda: from_flat(UnlearnConfig, {"optim.lr": "fast"}), "optim.lr"),
    (lambda: from_flat(UnlearnConfig, {"scaling.use_gpu": "maybe"}), "scaling.use_gpu"),
]


@pytest.mark.parametrize("make, field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_config_names_field(make, field):
    with pytest.raises(ValueError) as info:
        make()
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert field in message
    assert "allowed" in message


def test_error_names_value_and_allowed():
    with pytest.raises(ConfigError, match=r"optim\.name='sgd' is invalid: allowed one of 'adamw', 'muon'"):
        OptimConfig(name="sgd")
    # a range declared with the field, a choice declared by its Literal type, a cross-field rule
    with pytest.raises(ConfigError, match=r"^optim\.lr=0\.0 is invalid: allowed a positive number$"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match=r"^loss\.retain_reduction='mean' is invalid: allowed one of "
                       r"'token', 'sequence', 'padded_position'$"):
        LossConfig(retain_reduction="mean")
    with pytest.raises(ConfigError, match=r"^toyworld\.hidden_size=100 is invalid: allowed a multiple "
                       r"of num_heads=3$"):
        ToyWorldConfig(hidden_size=100, num_heads=3)


def test_defaults_are_valid_and_accumulation_is_derived():
    config = UnlearnConfig()
    assert config.accumulation_steps == 4  # 32 / (8 x 1)
    config = UnlearnConfig(scaling=ScalingConfig(num_workers=2))
    assert config.accumulation_steps == 2


def _custom():
    return UnlearnConfig(
        model=ModelConfig(name_or_path="EleutherAI/deep-ignorance-unfiltered", dtype="bfloat16"),
        loss=LossConfig(target_layers=(5, 10, 15), retain_coef=400.0, retain_loss="kl"),
        optim=OptimConfig(name="muon", muon_lr=0.02, adam_lr=3e-4, warmup_ratio=0.5),
        mode=ModeConfig(kind="full", lora_target_modules=("query_key_value", "dense")),
        data=DataConfig(num_examples=1024, retain_subset=None),
        scaling=ScalingConfig(num_workers=1, use_gpu=True),
        eval=EvalConfig(tasks=("wmdp_bio", "mmlu")),
        seed=7,
    )


def test_flat_round_trip_native():
    config = _custom()
    flat = to_flat(config)
    assert flat["loss.target_layers"] == [5, 10, 15]
    assert flat["data.retain_subset"] is None
    assert from_flat(UnlearnConfig, flat) == config


def test_flat_round_trip_through_strings_like_mlflow_params():
    config = _custom()
    as_strings = {k: str(v) for k, v in to_flat(config).items()}
    assert from_flat(UnlearnConfig, as_strings) == config


def test_flat_keys_cover_every_field_once():
    flat = to_flat(UnlearnConfig())
    assert len(flat) == len(set(flat))
    assert {"loss.retain_coef", "optim.muon_lr", "mode.lora_rank", "batch.global_batch",
            "scaling.num_workers", "seed"} <= set(flat)


def test_replace_applies_search_space_samples_and_revalidates():
    config = replace(UnlearnConfig(), {"loss.retain_coef": 12.5, "optim.lr": "3e-4"})
    assert config.loss.retain_coef == 12.5 and config.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="loss.retain_coef"):
        replace(config, {"loss.retain_coef": -2})
