"""A run folder's bookkeeping: one job at a time (a lock), which checkpoint a job resumes from, and whether the
folder's run was trained with the same settings.

    checkpoint-epoch-N/     adapter + optimizer/scheduler/RNG state after epoch N (resumable)
    final_model/            adapter, tokenizer, feature extractor, task.json
    eval/checkpoint-*/      predictions, metrics, plots
    logs/                   TensorBoard events
    training_config.json    what was trained, how, and how many parameters
    .hydra/                 the composed config
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi4_pron import dist

log = logging.getLogger(__name__)

RUN_RECORD = "training_config.json"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")
# Settings that do not change the trained model: a run may resume with other values of these.
RESUME_SAFE = (
    "logger",
    "eval",
    "resume",
    "experiment_description",
    "hardware.dataloader_num_workers",
    "hardware.per_device_eval_batch_size",
    "hardware.compile_cpp_wrapper",  # how the compiled kernels are launched (runs from before it lack the key)
    "hardware.audio_layers_kept",  # which activations are recomputed: the same gradients (runs before it lack the key)
)


class RunFolderError(RuntimeError):
    """The run folder holds another run, or another job is using it; the message says what to do."""


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in a run folder (by training step), or None. Only ``checkpoint-epoch-N``
    folders count (the Trainer's ``checkpoint-<step>`` becomes one only once it is whole), and only those with every
    file of :data:`CHECKPOINT_FILES`: an incomplete one is skipped with a warning, the previous one used."""
    best, best_step = None, -1
    for d in Path(run_dir).glob("checkpoint-epoch-*"):
        missing = [f for f in CHECKPOINT_FILES if not (d / f).exists()]
        if missing:
            log.warning("%s lacks %s: not resumable, skipped", d, missing)
            continue
        step = json.loads((d / "trainer_state.json").read_text()).get("global_step", -1)
        if step > best_step:
            best, best_step = d, step
    return best


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs (``key: saved -> current``), RESUME_SAFE ones left out."""
    if prefix.rstrip(".") in RESUME_SAFE:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            c
            for k in sorted(set(saved) | set(current), key=str)
            for c in config_changes(saved.get(k), current.get(k), f"{prefix}{k}.")
        ]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto`` continues from the newest complete checkpoint if the run folder has one, ``true`` requires
    one, ``false`` starts over, ``force`` continues even where the folder's run was trained with other settings (else
    refused, naming them)."""
    mode = str(cfg.resume).lower()
    if mode in ("false", "no", "0"):
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None and mode in ("true", "yes", "1", "force"):
        raise FileNotFoundError(
            f"resume={mode} but {run_dir} has no complete checkpoint-epoch-N folder to resume from."
        )
    if ckpt is None:
        return None
    saved = run_dir / RUN_RECORD
    if mode != "force" and saved.exists():
        settings = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # a composed config may carry it
        changes = config_changes(
            json.loads(saved.read_text())["config"], OmegaConf.to_container(settings, resolve=True)
        )
        if changes:
            raise RunFolderError(
                f"{run_dir} holds a run trained with other settings ({len(changes)}: {'; '.join(changes[:8])}). "
                "Resuming would keep that run's model under this config's record. Give this run its own folder "
                "(hydra.run.dir=output/<name>), start over in this one (resume=false), or continue it anyway "
                "(resume=force)."
            )
    log.info("resuming from %s", ckpt)
    return str(ckpt)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path):
    """An exclusive lock on the run folder for the whole job (rank 0 holds it): a second job fails at once, naming
    the holder, instead of mixing its checkpoints with this one's."""
    if not dist.is_main_process():
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")  # noqa: SIM115 - closed below
    except OSError as e:
        raise RunFolderError(
            f"cannot write the run folder {run_dir} ({e.strerror}): choose a writable output_root=... or "
            "hydra.run.dir=..."
        ) from None
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunFolderError(
                f"{run_dir} is in use by another job ({f.read().strip() or 'holder unknown'}): wait for it to end, "
                "or give this run another folder (hydra.run.dir=...)."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
