"""Shared fixtures: an isolated cache for the tiny model, offline W&B, and a helper that runs a training job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "data" / "speechocean762-mini"


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PHI4_PRON_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(_isolated_env) -> Path:
    from phi4_pron.tiny_model import TINY_MODEL_VERSION, ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(
        Path(os.environ["PHI4_PRON_CACHE"]) / f"tiny-phi4-multimodal-{TINY_MODEL_VERSION}", MINI
    )


@pytest.fixture(scope="session")
def tiny_processing(tiny_model_dir):
    from phi4_pron.modeling import load_tokenizer_and_features

    return load_tokenizer_and_features(str(tiny_model_dir))


def task_questions(name: str):
    """The questions of ``conf/task/<name>.yaml``, as training builds them."""
    from omegaconf import OmegaConf

    from phi4_pron.answer import questions_from_config

    return questions_from_config(OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml"))


@pytest.fixture(scope="session")
def paper_questions():
    return task_questions("paper")


@pytest.fixture(scope="session")
def joint_questions():
    return task_questions("joint")


@pytest.fixture(scope="session")
def hub_snapshot(tmp_path_factory) -> Path:
    """The bundled corpus as ``hf download mispeech/speechocean762 --repo-type dataset`` leaves the hub dataset."""
    from hub_layout import write_hub_snapshot

    return write_hub_snapshot(MINI, tmp_path_factory.mktemp("hub") / "speechocean762")


@pytest.fixture(scope="session")
def mini_train():
    from phi4_pron.data import load_split

    return load_split(str(MINI), "train")


def compose(overrides: list[str], config_name: str = "train"):
    """Compose the real config (with Hydra's own node) exactly as the entrypoint would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import phi4_pron.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def run_cli(args: list[str], cwd: Path = REPO, check: bool = True, timeout: int = 900, env: dict | None = None):
    """Run ``python -m <module> args`` in a subprocess: the real entrypoint, Hydra and all (``env``: variables added
    to this process's)."""
    import subprocess
    import sys

    env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


RUN_NAMES = {"r64": "paper_r64", "r320": "pretrained_r320"}


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Train each LoRA config once per session, through the real entrypoint; returns a getter."""
    runs: dict[str, Path] = {}

    def get(lora: str) -> Path:
        if lora not in runs:
            out = tmp_path_factory.mktemp(f"smoke_{lora}")
            run_cli(["-m", "phi4_pron.train", "experiment=smoke", f"lora={lora}", f"output_root={out}"])
            runs[lora] = out / RUN_NAMES[lora]
        return runs[lora]

    return get


def tiny_lora_model(tiny_model_dir):
    """The tiny model in fp32 with a fresh r8 LoRA, no dropout."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from phi4_pron.adapters import attach_speech_lora
    from phi4_pron.config import LORA_TARGET_MODULES

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = OmegaConf.create(
        {"init": "fresh", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGET_MODULES}
    )
    return attach_speech_lora(model, lora, path=str(tiny_model_dir))[0]


def cpu_trainer(model, tiny_processing, mini_train, tmp_path, trainer_cls=None, rows=2, **args):
    """The framework's trainer (TRL's SFTTrainer, fused answer-only LM head), or ``trainer_cls``, on the CPU."""
    from trl import SFTConfig

    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.trainer import PronunciationTrainer

    tokenizer, fe = tiny_processing
    config = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=args.pop("use_cpu", True),
        report_to=[],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        **args,
    )
    return (trainer_cls or PronunciationTrainer)(
        model=model,
        args=config,
        train_dataset=mini_train.select(range(rows)),
        data_collator=PronunciationCollator(tokenizer, fe, task_questions("joint")),
        processing_class=tokenizer,
    )


def joint_batch(tiny_processing, mini_train):
    from phi4_pron.collator import PronunciationCollator

    return PronunciationCollator(*tiny_processing, task_questions("joint"))([mini_train[i] for i in range(4)])


def loss_and_grads(model, fn):
    """``fn()``'s loss and every trainable parameter's gradient, from zero (the audio encoder's streaming-mask layout,
    drawn from numpy in training mode, seeded)."""
    import numpy as np

    model.zero_grad()
    np.random.seed(0)
    loss = fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
