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
    """Count grids to TensorBoard (as images) and to the active W&B run."""
    if tb_writer is not None:
        import matplotlib.image as mpimg

        for aspect, path in plots.items():
            tb_writer.add_image(f"eval/grid_{aspect}", mpimg.imread(path)[..., :3], step, dataformats="HWC")
        tb_writer.flush()
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({**{f"eval/grid_{a}": wandb.Image(str(p)) for a, p in plots.items()}, "train/global_step": step})


ANSWER_COLUMNS = [
    "id",
    "prompt text",
    *(f"{who} {k}" for who in ("human", "predicted") for k in ("accuracy", "fluency", "prosodic", "total")),
    "reference words",
    "predicted words",
    "reference phones",
    "predicted phones",
    "mispronounced (human)",
    "mispronounced (detected)",
    "status",
]


def answer_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per recording of an evaluation: scores, transcripts, and the canonical phones with the mispronounced
    ones in brackets (``W IY [K] AO``), as the raters marked them and as the answer's phones imply."""
    from phi4_pron.metrics import detected_mispronunciations

    def marked(phones: list[str], flags: list[bool]) -> str:
        return " ".join(f"[{p}]" if f else p for p, f in zip(phones, flags, strict=False))

    rows = []
    for r in records:
        ref, parsed = r["reference"], r.get("parsed") or {}
        status = "failed: " + str(r["error"]) if r.get("error") else ("answered" if r.get("parsed") else "unparseable")
        scores = ("accuracy", "fluency", "prosodic", "total")
        detected = detected_mispronunciations(ref["canonical"], parsed.get("phones", "")) if parsed else []
        rows.append(
            [
                r["id"],
                ref["text"],
                *(ref[k] for k in scores),
                *(parsed.get(k) for k in scores),
                ref["text"],
                parsed.get("transcript"),
                ref["phones"],
                parsed.get("phones"),
                marked(ref["canonical"], ref["mispronounced"]),
                marked(ref["canonical"], detected) if parsed else None,
                status,
            ]
        )
    return rows


def log_answers(predictions: Path, step: int, recordings: Any = None) -> None:
    """An evaluation's answers (its ``predictions.jsonl``) as a W&B Table (``eval/answers``) in the active run, read
    only where there is one; with ``recordings`` (the split: ``logger.wandb.log_audio``) each as ``wandb.Audio``."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    import tempfile

    from phi4_pron.results import read_predictions

    columns, rows = list(ANSWER_COLUMNS), answer_rows(read_predictions(predictions))
    audio = None if recordings is None else dict(zip(recordings["id"], recordings["audio"], strict=True))
    with tempfile.TemporaryDirectory() as tmp:  # embedded recordings as files while W&B copies them
        if audio is not None:
            columns.append("audio")
            rows = [[*row, _audio(wandb, audio.get(row[0]), Path(tmp) / f"{n}.wav")] for n, row in enumerate(rows)]
        wandb.log({"eval/answers": wandb.Table(columns=columns, data=rows), "train/global_step": step})


def _audio(wandb, cell: Any, spare: Path) -> Any:
    """A recording as ``wandb.Audio`` from its file (embedded bytes written to ``spare`` first); None if missing."""
    path = cell if isinstance(cell, str) else (cell or {}).get("path")
    if isinstance(cell, dict) and cell.get("bytes"):
        spare.write_bytes(cell["bytes"])
        path = str(spare)
    return wandb.Audio(path) if path and Path(path).exists() else None


def summarize(values: dict[str, Any]) -> None:
    """Put values in the active W&B run's summary (the newest epoch's Table 3 row ends up there)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.run.summary.update(values)
