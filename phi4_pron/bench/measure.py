"""One benchmark row: a ``python -m phi4_pron.train`` (or ``evaluate``) command run in this process, timed.

The config is composed by Hydra from ``conf/`` with the row's overrides, exactly as the entrypoint composes it, and
handed to :func:`phi4_pron.jobs.train.run_training` / :func:`phi4_pron.jobs.evaluate.run_evaluation`: the benchmark
adds a timer callback and nothing else.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from phi4_pron.config import REPO_ROOT


class GenerateTimes:
    """While active (``with GenerateTimes() as times``), every ``generate()`` call is timed into ``times.calls``: the
    wait before it (loading, the loader), its prefill (to the first token) and its decoding. Each token is
    synchronised through a streamer, which makes decoding look slower than it is (``bench.profile eval``)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._last = time.perf_counter()

    class _Stamps:  # a streamer that only notes when each token (the prompt first) is ready
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            sync()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def __enter__(self) -> GenerateTimes:
        from transformers import GenerationMixin

        self._generate = generate = GenerationMixin.generate
        self._last = time.perf_counter()

        def timed(model, *args, **kwargs):
            stamps = self._Stamps()
            sync()
            start = time.perf_counter()
            out = generate(model, *args, streamer=stamps, **kwargs)
            sync()
            end = time.perf_counter()
            prefill = stamps.times[1] - start if len(stamps.times) > 1 else end - start
            ids = kwargs["input_ids"]
            self.calls.append(
                {
                    "wait_s": start - self._last,
                    "prefill_s": prefill,
                    "decode_s": end - start - prefill,
                    "steps": out.shape[1] - ids.shape[1],
                    "width": ids.shape[1],
                    "batch": ids.shape[0],
                    "cache": kwargs.get("max_cache_len"),
                }
            )
            self._last = end
            return out

        GenerationMixin.generate = timed
        return self

    def __exit__(self, *exc) -> None:
        from transformers import GenerationMixin

        GenerationMixin.generate = self._generate


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``python -m phi4_pron.<entrypoint> <overrides>`` runs with (schema checks included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import phi4_pron.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def command(entrypoint: str, overrides: list[str]) -> str:
    return " ".join([f"python -m phi4_pron.{entrypoint}", *overrides])


def versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


def sync() -> None:
    """Wait for the GPU (a no-op without one)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else math.nan


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after the first ``warmup`` (compile) ones, the GPU synchronised only at the
    start and the end of that window (a sync per step would drain the GPU's queue, which training never does); the
    training split's mean tokens per sample; the language model's parameters that take part in each token's FLOPs."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.begin = self.start = self.end = self.peak_gib = self.prepare_peak_gib = math.nan
        self.steps, self.tokens_per_sample, self.samples, self.lm_params = 0, math.nan, 0, 0
        self.log_history: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        sync()
        self.begin = time.perf_counter()
        self.prepare_peak_gib = peak_gib()  # loading, the audio embedding pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        lengths = train_dataloader.dataset["length"]
        self.samples, self.tokens_per_sample = len(lengths), sum(lengths) / len(lengths)
        named = model.named_parameters()
        self.lm_params = sum(p.numel() for n, p in named if ".layers." in n and "lora_" not in n and "audio" not in n)
        self.lm_params += model.get_output_embeddings().weight.numel()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            sync()
            self.start = time.perf_counter()
        if state.global_step == state.max_steps:
            sync()
            self.end = time.perf_counter()
            self.steps = state.global_step - self.warmup
            self.peak_gib = peak_gib()

    def on_train_end(self, args, state, control, **kwargs):
        self.log_history = list(state.log_history)


def train_row(overrides: list[str], warmup: int, steps: int, run_dir: Path) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps with the config of ``overrides`` (``steps < 0``: to the end of the
    first epoch, so the timed steps are the epoch's but its first ``warmup``); the row's figures."""
    from phi4_pron.jobs.train import run_training

    whole = steps < 0
    overrides = [*overrides, "optim.epochs=1" if whole else f"optim.max_steps={warmup + steps}"]
    cfg = compose("train", overrides)
    free_memory()
    timer = StepTimer(warmup)
    run_training(cfg, run_dir=run_dir, callbacks=[timer])
    record = json.loads((run_dir / "training_config.json").read_text())
    per_step = record["effective_batch_size"]
    wall = timer.end - timer.start
    step_s = wall / timer.steps if timer.steps > 0 else math.nan
    timed = timer.samples - warmup * per_step if whole else timer.steps * per_step  # samples in the timed steps
    rate = timed / wall if timed > 0 else math.nan  # samples a second
    free_memory()
    return {
        "command": command("train", overrides),
        "s_per_step": step_s,
        "epoch_s": timer.samples / rate,
        "timed": f"steps {warmup + 1}-{warmup + timer.steps}" + (" (to the epoch's end)" if whole else "")
        if timer.steps > 0
        else "none",
        "warmup_s": timer.start - timer.begin,
        "audio_cache_s": record.get("audio_embeddings_cache_s"),
        "samples_per_epoch": timer.samples,
        "samples_per_s": rate,
        "tokens_per_sample": round(timer.tokens_per_sample, 1),
        "tflops": 4 * timer.lm_params * timer.tokens_per_sample * rate / 1e12,
        "peak_gib": timer.peak_gib,  # the training steps
        "prepare_peak_gib": timer.prepare_peak_gib,
        "trainable_params": record["trainable_params"],
        "losses": [h["loss"] for h in timer.log_history if "loss" in h],
        "run_dir": str(run_dir),
    }


def eval_row(overrides: list[str], scale_to: int | None = None) -> dict[str, Any]:
    """Run ``python -m phi4_pron.evaluate <overrides>``; wall seconds, and the generation's share (compile
    included) from its metrics.json. ``scale_to``: the seconds scaled to that many recordings."""
    from phi4_pron.jobs.evaluate import run_evaluation

    cfg = compose("evaluate", overrides)
    free_memory()
    start = time.perf_counter()
    metrics = run_evaluation(cfg)
    wall = time.perf_counter() - start
    saved = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    n = metrics["n_utterances"]
    scale = (scale_to or n) / n
    row = {
        "command": command("evaluate", overrides),
        "recordings": n,
        "wall_s": wall,
        "generate_s": saved["seconds"]["generate"],
        "score_s": saved["seconds"]["score"],
        "test_split_s": (saved["seconds"]["generate"] + saved["seconds"]["score"]) * scale,
        "failed": metrics["n_failed"],
        "peak_gib": peak_gib(),
    }
    free_memory()
    return row


class JobTimer(TrainerCallback):
    """Marks of a training job (the GPU synchronised at each): the Trainer's start (after loading and epoch 0's
    evaluation), the end of the ``warmup`` (compiling) steps and of the last step, the checkpoint saved, the end (after
    the last evaluation); the peak memory of the steps and of the last evaluation."""

    def __init__(self, warmup: int):
        self.warmup, self.marks, self.log_history = warmup, {}, []
        self.samples, self.steps, self.steps_peak_gib = 0, 0, math.nan

    def _mark(self, name: str) -> None:
        sync()
        self.marks[name] = time.perf_counter()

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._mark("train_begin")
        self.samples = len(train_dataloader.dataset)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._mark("compiled")
        if state.global_step == state.max_steps:
            self._mark("last_step")
            self.steps, self.steps_peak_gib = state.global_step, peak_gib()

    def on_save(self, args, state, control, **kwargs):
        self._mark("saved")  # before the evaluation (its callback comes after this one)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, **kwargs):
        self._mark("train_end")
        self.log_history = list(state.log_history)


def disk_footprint(run_dir: Path, epochs: int) -> dict[str, float]:
    """GiB on disk: one checkpoint (its optimizer state apart), final_model/, and a run of ``epochs`` epochs with the
    optimizer state in the newest checkpoint only (keep_optimizer_states=1) and in every one (-1)."""

    def gib(paths) -> float:
        return (
            sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2**30
        )

    ckpt = next(iter(sorted(run_dir.glob("checkpoint-epoch-*"))), None)
    if ckpt is None:
        return {}
    optimizer = gib([f for f in ckpt.iterdir() if f.name.startswith("optimizer")])
    adapter = gib([ckpt]) - optimizer
    final = gib([run_dir / "final_model"])
    return {
        "checkpoint_gib": adapter + optimizer,
        "optimizer_state_gib": optimizer,
        "final_model_gib": final,
        f"run_{epochs}_epochs_gib": epochs * adapter + optimizer + final,
        f"run_{epochs}_epochs_all_optimizer_states_gib": epochs * (adapter + optimizer) + final,
    }


def job_row(overrides: list[str], warmup: int, run_dir: Path, epochs: int = 4) -> dict[str, Any]:
    """One epoch of ``python -m phi4_pron.train <overrides>`` as the main job runs it (the test split evaluated
    before training and after the epoch, the checkpoint saved, ``table3.md`` written), timed from the call to its
    return, with its parts; and the same job's ``epochs``-epoch time projected from those parts."""
    from phi4_pron.jobs.train import run_training

    overrides = [*overrides, "optim.epochs=1", "eval.every_epoch=true", "eval.before_training=true"]
    cfg = compose("train", overrides)
    free_memory()
    timer = JobTimer(warmup)
    start = time.perf_counter()
    run_training(cfg, run_dir=run_dir, callbacks=[timer])
    sync()
    end, m = time.perf_counter(), timer.marks
    evals = [h["eval/seconds"] for h in timer.log_history if "eval/seconds" in h]
    per_step = json.loads((run_dir / "training_config.json").read_text())["effective_batch_size"]
    timed = timer.samples - warmup * per_step
    rate = timed / (m["last_step"] - m["compiled"]) if timed > 0 else math.nan  # samples a second, after warmup
    parts = {
        "load_s": m["train_begin"] - start - evals[0],
        "eval_first_s": evals[0],  # decoding compiled here
        "compile_steps_s": m["compiled"] - m["train_begin"],
        "steps_s": m["last_step"] - m["compiled"],
        "save_s": m["saved"] - m["last_step"],
        "eval_s": evals[-1],
        "final_s": end - m["train_end"],  # final_model/, table3.md, memory released
    }
    epoch_s = timer.samples / rate
    projected = (
        parts["load_s"]
        + parts["eval_first_s"]
        + parts["compile_steps_s"]
        + parts["steps_s"]
        + (epochs - 1) * epoch_s
        + epochs * (parts["save_s"] + parts["eval_s"])
        + parts["final_s"]
    )
    return {
        "command": command("train", overrides),
        "total_s": end - start,
        **parts,
        "epoch_s": epoch_s,
        f"projected_{epochs}_epochs_s": projected,
        "steps_peak_gib": timer.steps_peak_gib,
        "eval_peak_gib": peak_gib(),  # the evaluation inside training, the Trainer's memory held
        **disk_footprint(run_dir, epochs),
        "table3": (run_dir / "table3.md").exists(),
        "run_dir": str(run_dir),
    }
