"""Experiment tracking: one W&B run per job (resolved Hydra config as its config) and TensorBoard events."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi4_pron.dist import is_main_process


def tensorboard_callback(cfg: DictConfig, run_dir: Path):
    if not cfg.logger.tensorboard or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "logs")))


def start_wandb(cfg: DictConfig, run_dir: Path, job_type: str, name: str, group: str | None = None) -> Any:
    """Start this job's W&B run before the Trainer does, so it carries the whole resolved config.

    Group: ``logger.wandb.group`` if set, else the sweep (all jobs of one ``-m`` run), else the experiment.
    """
    if not cfg.logger.wandb.enabled or not is_main_process():
        return None
    import wandb

    w = cfg.logger.wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=w.project,
        entity=w.entity,
        mode=w.mode,
        group=w.group or group or cfg.experiment_name,
        name=name,
        job_type=job_type,
        tags=[cfg.lora.name, cfg.hardware.name, cfg.model.name, *w.tags],
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(run_dir),
        reinit="finish_previous",
    )


def finish_wandb(run: Any, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
    if run is None:
        return
    if summary:
        run.summary.update(summary)
    run.finish(exit_code=exit_code)


def log_plots(plots: dict[str, Path], step: int, tb_writer=None) -> None:
    """Scatter plots to TensorBoard (as images) and to the active W&B run."""
    if tb_writer is not None:
        import matplotlib.image as mpimg

        for aspect, path in plots.items():
            tb_writer.add_image(f"eval/scatter_{aspect}", mpimg.imread(path)[..., :3], step, dataformats="HWC")
        tb_writer.flush()
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({**{f"eval/scatter_{a}": wandb.Image(str(p)) for a, p in plots.items()}, "train/global_step": step})


def summarize(values: dict[str, Any]) -> None:
    """Put values in the active W&B run's summary (the newest epoch's Table 3 row ends up there)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.run.summary.update(values)
