"""Hydra composition of every group, and the schema rejecting typos and wrong types."""

from __future__ import annotations

import pytest
from conftest import compose, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

GROUPS = {
    "model": ["phi4mm", "tiny"],
    "lora": ["r320", "r64"],
    "data": ["speechocean762", "mini"],
    "hardware": ["a100", "a6000", "2x4090", "h100", "cpu"],
    "logger": ["wandb", "tensorboard", "none"],
    "task": ["paper", "joint"],
    "optim": ["paper", "guide"],
    "experiment": ["smoke"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"])
    with open_dict(cfg):
        del cfg["hydra"]  # its interpolations resolve inside a Hydra run only
    OmegaConf.resolve(cfg)  # every interpolation of the job's config resolves
    if group != "experiment":
        assert cfg[group].name == option


def test_defaults_are_the_paper_setting():
    cfg = compose([])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.effective_batch_size) == (2e-5, 4, 64)
    assert cfg.task.name == "paper" and list(cfg.task.questions) == ["apa", "mdd"] and not cfg.train_audio_encoder
    assert cfg.model.revision == "refs/pr/70"  # the hub's native layout (main is remote code)
    assert cfg.hardware.per_device_train_batch_size == 16 and cfg.hardware.compile and cfg.model.max_length == 2048
    assert cfg.hardware.compile_cpp_wrapper and not compose(["hardware=cpu"]).hardware.compile_cpp_wrapper
    assert cfg.model.name_or_path == "microsoft/Phi-4-multimodal-instruct" and cfg.model.dtype == "bfloat16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init.value) == (64, 128, 0.05, "fresh")
    r320 = compose(["lora=r320"]).lora
    assert (r320.r, r320.alpha, r320.dropout, r320.init.value) == (320, 640, 0.01, "pretrained")
    assert (r320.vision.r, r320.vision.alpha, r320.vision.trainable) == (256, 512, False)


def test_run_dir_is_named_after_the_lora_config():
    assert compose(["lora=r320"]).hydra.run.dir == "output/pretrained_r320"
    assert compose(["lora=r64"]).hydra.run.dir == "output/paper_r64"
    assert compose(["experiment=smoke", "lora=r64"]).hydra.run.dir == "output/smoke/paper_r64"
    assert compose(["lora=r64", "train_audio_encoder=true"]).hydra.run.dir == "output/paper_r64_unfreeze"


@pytest.mark.parametrize("override,key", [("optim.lrr=1e-5", "lrr"), ("lora.rank=8", "rank"), ("seeed=1", "seeed")])
def test_misspelt_key_fails_naming_it(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override", ["optim.epochs=three", "lora.r=big", "lora.init=random", "hardware=tpu"])
def test_wrong_value_fails(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_gradient_accumulation_is_derived_from_the_effective_batch():
    from phi4_pron.trainer import gradient_accumulation

    assert gradient_accumulation(compose(["hardware=a100"]), world_size=1) == 4  # 64 / 16
    assert gradient_accumulation(compose(["hardware=h100", "train_audio_encoder=true"]), world_size=1) == 4  # 64 / 16
    assert gradient_accumulation(compose(["hardware=a6000"]), world_size=1) == 8  # 64 / 8
    assert gradient_accumulation(compose(["hardware=2x4090"]), world_size=2) == 8
    assert gradient_accumulation(compose(["hardware=2x4090", "train_audio_encoder=true"]), world_size=2) == 16  # 64/4
    with pytest.raises(ValueError, match="effective_batch_size"):
        gradient_accumulation(compose(["optim.effective_batch_size=12"]), world_size=1)


@pytest.mark.parametrize(
    "overrides,pinned,non_blocking",
    [
        (["hardware=h100"], True, True),
        (["hardware=h100", "hardware.dataloader_pin_memory=false"], False, False),
        (["hardware=cpu"], False, False),  # TrainingArguments pins nothing without a GPU
    ],
)
def test_gpu_batches_are_pinned_and_copied_without_waiting(tmp_path, overrides, pinned, non_blocking):
    from phi4_pron.trainer import sft_config

    # bf16 off: TrainingArguments refuses bf16 on a machine without a GPU
    args = sft_config(compose([*overrides, "hardware.bf16=false", "logger=none"]), tmp_path, world_size=1)
    assert (args.dataloader_pin_memory, args.accelerator_config.non_blocking) == (pinned, non_blocking)


def test_cli_rejects_typo_before_loading_anything():
    proc = run_cli(["-m", "phi4_pron.train", "optim.lrr=1e-5"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "Loading weights" not in proc.stderr


def test_cli_prints_the_composed_config():
    proc = run_cli(["-m", "phi4_pron.train", "--cfg", "job", "lora=r320"], timeout=120)
    assert "run_name: ${lora.run_name}" in proc.stdout and "r: 320" in proc.stdout


def test_a_gpu_preset_without_a_gpu_names_the_fix(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the error is for a machine without a GPU")
    args = ["-m", "phi4_pron.train", "experiment=smoke", "hardware=a100", "optim.effective_batch_size=16"]
    proc = run_cli([*args, "logger=none", f"hydra.run.dir={tmp_path}"], check=False, timeout=300)
    assert proc.returncode != 0 and "hardware=a100 trains on 1 GPU(s)" in proc.stderr
    assert "hardware=cpu" in proc.stderr and "Loading weights" not in proc.stderr


def test_settings_hydra_lets_through_are_refused():
    from phi4_pron.config import SettingError, TrainConfig, check_settings

    check_settings(compose(["experiment=smoke"]), TrainConfig)
    with pytest.raises(SettingError, match="lrr"):
        check_settings(compose(["+optim.lrr=1e-5"]), TrainConfig)
    with pytest.raises(SettingError, match=r"optim.lr=-0.001 must be above 0.*optim.epochs=0.0 must be above 0"):
        check_settings(compose(["optim.lr=-1e-3", "optim.epochs=0"]), TrainConfig)
    with pytest.raises(SettingError, match=r"hardware.audio_layers_kept=-1 must be 0 or above"):
        check_settings(compose(["hardware.audio_layers_kept=-1"]), TrainConfig)


def test_the_cli_refuses_an_added_key_before_loading(tmp_path):
    proc = run_cli(
        ["-m", "phi4_pron.train", "experiment=smoke", "+optim.lrr=1e-5", f"output_root={tmp_path}"],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and "optim.lrr is not a setting" in proc.stderr
    assert "Loading weights" not in proc.stderr  # (Hydra has made the run folder by then, nothing more)


@pytest.mark.parametrize(
    "override, named",
    [
        ("lora.r=0", "lora.r=0 must be 1 or above"),
        ("lora.dropout=2.0", "lora.dropout=2.0 must be in [0, 1)"),
        ("hardware.per_device_train_batch_size=0", "hardware.per_device_train_batch_size=0 must be 1 or above"),
        ("model.dtype=float99", "model.dtype='float99' must be one of bfloat16"),
        ("data.max_train_samples=0", "data.max_train_samples=0 must be 1 or above"),
        ("eval.limit=-1", "eval.limit=-1 must be 1 or above"),
        ("resume=sometimes", "resume='sometimes' must be one of auto"),
        ("logger.wandb.mode=onlin", "logger.wandb.mode='onlin' must be one of online"),
    ],
)
def test_every_numeric_and_enumerated_setting_is_checked(override, named):
    from phi4_pron.config import SettingError, TrainConfig, check_settings

    with pytest.raises(SettingError) as e:
        check_settings(compose(["experiment=smoke", override]), TrainConfig)
    assert named in str(e.value)
