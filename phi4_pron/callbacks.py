"""Trainer callbacks: checkpoint folders named by epoch."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from phi4_pron.answer import TASK_FILE
from phi4_pron.dist import barrier
from phi4_pron.results import write_json_atomic

log = logging.getLogger(__name__)


def saved_epoch(state) -> int:
    """The epoch a save happens at the end of (a partial last epoch counts as one): N of checkpoint-epoch-N."""
    return math.ceil(state.epoch - 1e-6)


class EpochCheckpointCallback(TrainerCallback):
    """Renames the Trainer's ``checkpoint-<step>`` to ``checkpoint-epoch-<N>`` right after it is saved.

    The folder keeps everything the Trainer wrote (adapter, optimizer, scheduler, RNG states,
    ``trainer_state.json``), so ``Trainer.train(resume_from_checkpoint=...)`` continues from it, and gets the task's
    ``task.json`` so that evaluate and assess ask the questions it was trained on.
    """

    def __init__(self, task: dict | None = None):
        self.task = task

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (its RNG state) before the folder moves
        if not state.is_world_process_zero:
            return
        src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not src.is_dir():
            return
        dst = Path(args.output_dir) / f"checkpoint-epoch-{saved_epoch(state)}"
        if self.task is not None:
            write_json_atomic(src / TASK_FILE, self.task)
        old = dst.with_name(dst.name + ".old")
        if dst.exists():  # a resumed run re-saving the same epoch: a whole folder under the name at every moment
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")


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


class EpochEvalCallback(TrainerCallback):
    """After each epoch's checkpoint, evaluate on the test split (or ``eval.limit`` utterances) and log it.

    Results go to ``<run>/eval/checkpoint-epoch-N/`` (predictions, metrics, plots) and, through
    ``trainer.log``, to every logger the Trainer reports to, with the epoch number. The evaluation leaves training
    as it found it: the model's train mode and every random generator's state are restored afterwards.
    """

    def __init__(
        self,
        trainer,
        tokenizer,
        feature_extractor,
        questions,
        dataset,
        run_dir: Path,
        batch_size: int,
        max_new_tokens: int,
        tb_writer=None,
        info: dict | None = None,
    ):
        self.trainer, self.tokenizer, self.feature_extractor = trainer, tokenizer, feature_extractor
        self.questions, self.dataset, self.run_dir = questions, dataset, Path(run_dir)
        self.batch_size, self.max_new_tokens, self.tb_writer = batch_size, max_new_tokens, tb_writer
        self.info = info or {}  # written into every metrics.json (the task, the setting)
        self.last: dict | None = None  # the newest evaluation's metrics

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.evaluate(model, saved_epoch(state), state.global_step)

    def evaluate(self, model, epoch: int, step: int) -> dict:
        from phi4_pron.predictions import HEADLINE, evaluate_model
        from phi4_pron.tracking import log_plots, summarize

        name = f"checkpoint-epoch-{epoch}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the training activations' cache to generation
        with preserved_rng(), torch.compiler.set_stance("force_eager"):  # compiled layers are for training
            metrics, plots = evaluate_model(
                model,
                self.tokenizer,
                self.feature_extractor,
                self.questions,
                self.dataset,
                self.run_dir / "eval" / name,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
                info={"checkpoint": name, "epoch": epoch, "step": step, **self.info},
                num_workers=self.trainer.args.dataloader_num_workers,
            )
        self.trainer.log({f"eval/{k}": metrics[k] for k in HEADLINE})
        log_plots(plots, step, self.tb_writer)
        summarize({"epoch": epoch, **{f"table3/{k}": metrics[k] for k in HEADLINE}})
        self.last = metrics
        return metrics


@contextlib.contextmanager
def preserved_rng():
    """Python's, numpy's, torch's (and CUDA's) random states restored on exit: what runs inside (generation, data
    workers) draws nothing that training would otherwise have drawn."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
