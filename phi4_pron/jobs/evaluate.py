"""The job behind ``python -m phi4_pron.evaluate``: one checkpoint of a run on the test split, or saved predictions
re-scored (no model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi4_pron.answer import Question, questions_from_config, task_info
from phi4_pron.config import DataConfig, HardwareConfig, LoggerConfig
from phi4_pron.data import load_checked
from phi4_pron.fast.generation import fast_generation
from phi4_pron.inference import load_adapter_for_inference, saved_task
from phi4_pron.modeling import ModelPathError
from phi4_pron.paper import logged
from phi4_pron.predictions import HEADLINE, evaluate_model, reparse, score, write_results
from phi4_pron.results import read_predictions
from phi4_pron.run_folder import RUN_RECORD
from phi4_pron.table3 import write_table3
from phi4_pron.tracking import finish_wandb, log_answers, log_plots, start_wandb

log = logging.getLogger(__name__)


def training_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was trained with."""
    file = run_dir / RUN_RECORD
    if not file.exists():
        raise ModelPathError(f"{run_dir} has no {RUN_RECORD}: is run_dir a phi4_pron training run folder?")
    return OmegaConf.create(json.loads(file.read_text())["config"])


def settings(changes: DictConfig, trained: DictConfig, schema: type) -> DictConfig:
    """One group's settings for evaluation: the run's own, or the option picked on the command line (``hardware=cpu``,
    which names itself) over the schema's defaults; with the keys the command line set (not None) on top."""
    base = OmegaConf.structured(schema) if changes.name is not None else trained
    return OmegaConf.merge(base, _set_keys(OmegaConf.to_container(changes, enum_to_str=True)))


def _set_keys(node: dict) -> dict:
    """``node`` without its None values, nested dicts alike."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            value = _set_keys(value) or None
        if value is not None:
            out[key] = value
    return out


def rescoring_questions(cfg: DictConfig, predictions: Path) -> tuple[dict[str, Question], dict[str, Any]]:
    """The task of saved predictions: ``task=`` if given, else the one their metrics.json or run folder names."""
    if cfg.task is not None:
        return questions_from_config(cfg.task), task_info(cfg.task)
    metrics_file = predictions.parent / "metrics.json"
    if metrics_file.exists() and "task_config" in (saved := json.loads(metrics_file.read_text())):
        info = {k: saved[k] for k in ("task", "comparable_with_paper", "train_audio_encoder", "task_config")}
        return questions_from_config(saved["task_config"]), info
    raise ValueError(
        f"{predictions}: no metrics.json with the task beside it; say which questions were asked: task=paper or "
        "task=joint."
    )


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    if cfg.predictions:
        return _rescore(cfg, Path(cfg.predictions), Path(cfg.out_dir))
    if not cfg.run_dir:
        raise ValueError("give run_dir=<training run folder> (or predictions=<predictions.jsonl> to re-score).")
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / cfg.checkpoint
    if not (ckpt / "adapter_config.json").exists():
        found = sorted(p.name for p in run_dir.glob("*") if (p / "adapter_config.json").exists())
        raise ModelPathError(f"{ckpt} holds no adapter; this run has: {found or 'none'}.")
    trained = training_config(run_dir)
    data = settings(cfg.data, trained.data, DataConfig)
    hardware = settings(cfg.hardware, trained.hardware, HardwareConfig)
    run_cfg = OmegaConf.merge(trained, {"logger": settings(cfg.logger, trained.logger, LoggerConfig)})
    task = cfg.task if cfg.task is not None else saved_task(ckpt)  # the questions, worked out once
    questions = questions_from_config(task)
    # checked before the model loads; a recording that cannot be decoded stays in, counted as failed
    dataset, problems = load_checked(data, data.eval_split, cfg.eval.limit, audio=False)
    if problems:
        log.warning("%s split: %d problems: %s", data.eval_split, len(problems), problems[:3])

    model, tokenizer, feature_extractor = load_adapter_for_inference(
        ckpt,
        dtype=trained.model.dtype,
        attn_implementation=hardware.attn_implementation,
        device="cpu" if hardware.num_gpus == 0 else None,
    )
    compiled = hardware.compile if cfg.eval.compile is None else cfg.eval.compile
    wandb_run = start_wandb(run_cfg, run_dir, job_type="eval", name=f"{trained.run_name}/{cfg.checkpoint}")
    with fast_generation(model, compile_prompts=compiled and model.device.type == "cuda"):
        metrics, plots = evaluate_model(
            model,
            tokenizer,
            feature_extractor,
            questions,
            dataset,
            Path(cfg.out_dir),
            batch_size=cfg.eval.batch_size or hardware.per_device_eval_batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            info={
                "checkpoint": cfg.checkpoint,
                "data": data.path,
                "split": data.eval_split,
                **task_info(task, bool(trained.get("train_audio_encoder", False))),
            },
            num_workers=hardware.dataloader_num_workers,
            compiled=compiled,
            resamples=cfg.eval.bootstrap,
        )
    if wandb_run is not None:
        wandb_run.log({f"eval/{k}": v for k, v in logged(metrics).items()})
        log_plots(plots, step=0)
        recordings = dataset if run_cfg.logger.wandb.log_audio else None
        log_answers(Path(cfg.out_dir) / "predictions.jsonl", 0, recordings)
    finish_wandb(wandb_run, {f"eval/{k}": v for k, v in logged(metrics).items()})
    print(write_table3(run_dir), end="")
    return metrics


def _rescore(cfg: DictConfig, predictions: Path, out_dir: Path) -> dict[str, Any]:
    questions, info = rescoring_questions(cfg, predictions)
    records = reparse(read_predictions(predictions), questions)
    metrics = score(records, cfg.eval.bootstrap)
    write_results(out_dir, records, metrics, info={**info, "rescored_from": str(predictions)})
    print(json.dumps({k: metrics[k] for k in HEADLINE}, indent=2))
    log.info("re-scored results in %s (the originals beside %s are unchanged)", out_dir, predictions)
    return metrics
