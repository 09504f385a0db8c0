"""Trainer callbacks: checkpoint folders named by epoch, and the evaluation after each."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from phi4_pron.answer import TASK_FILE
from phi4_pron.dist import barrier
from phi4_pron.results import write_json_atomic, write_text_atomic
from phi4_pron.run_folder import RUN_STAMP, prune_optimizer_states

log = logging.getLogger(__name__)


def saved_epoch(state) -> int:
    """The epoch a save happens at the end of (a partial last epoch counts as one): N of checkpoint-epoch-N."""
    return math.ceil(state.epoch - 1e-6)


class EpochCheckpointCallback(TrainerCallback):
    """Renames the Trainer's ``checkpoint-<step>`` to ``checkpoint-epoch-<N>`` right after it is saved.

    The folder keeps everything the Trainer wrote (adapter, optimizer, scheduler, RNG states,
    ``trainer_state.json``), so ``Trainer.train(resume_from_checkpoint=...)`` continues from it, and gets the task's
    ``task.json`` so that evaluate and assess ask the questions it was trained on, and the run's id (``run_id``): a
    resume takes only checkpoints of its own run.
    """

    def __init__(self, task: dict | None = None, run_id: str | None = None, keep_optimizer_states: int = -1):
        self.task, self.run_id, self.keep_optimizer_states = task, run_id, keep_optimizer_states

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
        if self.run_id is not None:
            write_text_atomic(src / RUN_STAMP, self.run_id + "\n")
        old = dst.with_name(dst.name + ".old")
        if dst.exists():  # a resumed run re-saving the same epoch: a whole folder under the name at every moment
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        prune_optimizer_states(dst.parent, self.keep_optimizer_states)  # once the new one is whole


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
        compiled: bool = False,
        resamples: int = 0,
        log_audio: bool = False,
    ):
        self.trainer, self.tokenizer, self.feature_extractor = trainer, tokenizer, feature_extractor
        self.questions, self.dataset, self.run_dir = questions, dataset, Path(run_dir)
        self.batch_size, self.max_new_tokens, self.tb_writer = batch_size, max_new_tokens, tb_writer
        self.info = info or {}  # written into every metrics.json (the task, the setting)
        self.last: dict | None = None  # the newest evaluation's metrics
        self.compiled = compiled  # a static cache and compiled decoding steps, as evaluate decodes (eval.compile)
        self.resamples = resamples  # bootstrap intervals (eval.bootstrap)
        self.log_audio = log_audio  # the answers table carries the recordings (logger.wandb.log_audio)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.evaluate(model, saved_epoch(state), state.global_step)

    def evaluate(self, model, epoch: int, step: int) -> dict:
        import torch._inductor.config

        from phi4_pron.fast.generation import fast_generation
        from phi4_pron.fast.layers import uncompiled
        from phi4_pron.paper import logged
        from phi4_pron.predictions import evaluate_model
        from phi4_pron.tracking import log_answers, log_plots, summarize

        name = f"checkpoint-epoch-{epoch}"
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the training activations' cache to generation
        # training's compiled layers run plain (their graphs are for training) and Inductor takes its defaults, so the
        # decoding step compiles as in evaluate
        with (
            preserved_rng(),
            uncompiled(model),
            torch._inductor.config.patch(cpp_wrapper=False),
            fast_generation(model),
        ):
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
                compiled=self.compiled,
                resamples=self.resamples,
            )
        values = logged(metrics)
        self.trainer.log({**{f"eval/{k}": v for k, v in values.items()}, "eval/seconds": time.perf_counter() - start})
        log_plots(plots, step, self.tb_writer)
        log_answers(self.run_dir / "eval" / name / "predictions.jsonl", step, self.dataset if self.log_audio else None)
        summarize({"epoch": epoch, **{f"table3/{k}": v for k, v in values.items()}})
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
