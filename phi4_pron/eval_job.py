"""``python -m phi4_pron.evaluate``: one checkpoint of a run on the test split, or saved predictions re-scored."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi4_pron.data import load_split
from phi4_pron.evaluation import HEADLINE, evaluate_model, read_predictions, reparse, score, write_results
from phi4_pron.inference import load_adapter_for_inference
from phi4_pron.modeling import ModelPathError
from phi4_pron.report import write_table3
from phi4_pron.tracking import finish_wandb, log_plots, start_wandb

log = logging.getLogger(__name__)


def training_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was trained with."""
    file = run_dir / "training_config.json"
    if not file.exists():
        raise ModelPathError(f"{run_dir} has no training_config.json: is run_dir a phi4_pron training run folder?")
    return OmegaConf.create(json.loads(file.read_text())["config"])


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    if cfg.predictions:
        records = reparse(read_predictions(Path(cfg.predictions)))
        metrics = score(records)
        write_results(out_dir, records, metrics, info={"rescored_from": str(cfg.predictions)})
        print(json.dumps({k: metrics[k] for k in HEADLINE}, indent=2))
        return metrics
    if not cfg.run_dir:
        raise ValueError("give run_dir=<training run folder> (or predictions=<predictions.jsonl> to re-score).")
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / cfg.checkpoint
    if not (ckpt / "adapter_config.json").exists():
        found = sorted(p.name for p in run_dir.glob("*") if (p / "adapter_config.json").exists())
        raise ModelPathError(f"{ckpt} holds no adapter; this run has: {found or 'none'}.")
    trained = training_config(run_dir)
    data = cfg.data or trained.data
    hardware = cfg.hardware or trained.hardware
    run_cfg = OmegaConf.merge(trained, {"logger": cfg.logger or trained.logger})

    model, tokenizer, feature_extractor = load_adapter_for_inference(
        ckpt,
        dtype=trained.model.dtype,
        attn_implementation=hardware.attn_implementation,
        device="cpu" if hardware.num_gpus == 0 else None,
    )
    dataset = load_split(data.path, data.eval_split, data.revision, cfg.eval.limit)
    wandb_run = start_wandb(run_cfg, run_dir, job_type="eval", name=f"{trained.run_name}/{cfg.checkpoint}")
    metrics, plots = evaluate_model(
        model,
        tokenizer,
        feature_extractor,
        dataset,
        out_dir,
        batch_size=cfg.eval.batch_size or hardware.per_device_eval_batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        info={"checkpoint": cfg.checkpoint, "data": data.path, "split": data.eval_split},
        num_workers=hardware.dataloader_num_workers,
        compiled=hardware.compile if cfg.eval.compile is None else cfg.eval.compile,
    )
    if wandb_run is not None:
        wandb_run.log({f"eval/{k}": metrics[k] for k in HEADLINE})
        log_plots(plots, step=0)
    finish_wandb(wandb_run, {f"eval/{k}": metrics[k] for k in HEADLINE})
    print(write_table3(run_dir), end="")
    return metrics
