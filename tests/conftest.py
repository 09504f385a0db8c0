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


SLOW_MODULES = {"test_learning", "test_sweep", "test_distributed", "test_bench", "test_train"}


def pytest_collection_modifyitems(items):
    """``slow``: whole modules that train through the entrypoint, and every test using a trained smoke run."""
    for item in items:
        if item.module.__name__ in SLOW_MODULES or "smoke_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
