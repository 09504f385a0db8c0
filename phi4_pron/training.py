"""One training job: model + speech LoRA + data + collator -> TRL SFTTrainer (PronunciationTrainer) -> a run folder.

Run folder (Hydra's output dir)::

    checkpoint-epoch-N/     adapter + optimizer/scheduler/RNG state after epoch N (resumable)
    final_model/            adapter_config.json, adapter_model.safetensors, tokenizer, feature extractor
    logs/                   TensorBoard events
    training_config.json    what was trained, how, and how many parameters
    .hydra/                 the composed config
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from peft import cast_mixed_precision_params
from transformers import set_seed
from trl import SFTConfig

from phi4_pron import __version__, dist
from phi4_pron.answer import TASK_FILE, Question, questions_from_config
from phi4_pron.audio_cache import cache_audio_embeddings, unsupported_reason
from phi4_pron.callbacks import EpochCheckpointCallback, EpochEvalCallback, latest_checkpoint
from phi4_pron.collator import PronunciationCollator
from phi4_pron.config import LoraInit, OnBad, SettingError
from phi4_pron.data import checked, expand_questions, load_split, with_lengths
from phi4_pron.modeling import (
    AUDIO_MODULES,
    adapter_summary,
    attach_speech_lora,
    audio_token_id,
    checkpoint_audio_layers,
    compile_layers,
    load_base_model,
    load_tokenizer_and_features,
    resolve_model_path,
    vision_lora_summary,
)
from phi4_pron.predictions import task_info
from phi4_pron.results import write_json_atomic
from phi4_pron.sweep import wandb_identity
from phi4_pron.tracking import finish_wandb, report_to, start_wandb, tensorboard_callback
from phi4_pron.trainer import PronunciationTrainer

log = logging.getLogger(__name__)


def gradient_accumulation(cfg: DictConfig, world_size: int) -> int:
    """Accumulation steps that keep ``optim.effective_batch_size``; it must divide evenly."""
    per_step = cfg.hardware.per_device_train_batch_size * world_size
    accum, rest = divmod(cfg.optim.effective_batch_size, per_step)
    if accum < 1 or rest:
        raise ValueError(
            f"optim.effective_batch_size={cfg.optim.effective_batch_size} is not a multiple of "
            f"hardware.per_device_train_batch_size={cfg.hardware.per_device_train_batch_size} x {world_size} "
            "process(es); change one of them."
        )
    return accum


class RunFolderError(RuntimeError):
    """The run folder holds another run, or another job is using it; the message says what to do."""


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
    saved = run_dir / "training_config.json"
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


def sft_config(cfg: DictConfig, run_dir: Path, world_size: int) -> SFTConfig:
    hw, opt = cfg.hardware, cfg.optim
    return SFTConfig(
        output_dir=str(run_dir),
        run_name=cfg.run_name,
        num_train_epochs=opt.epochs,
        max_steps=opt.max_steps,
        per_device_train_batch_size=hw.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, world_size),
        learning_rate=opt.lr,
        optim=opt.optimizer,
        weight_decay=opt.weight_decay,
        warmup_steps=opt.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps (the ratio)
        lr_scheduler_type=opt.lr_scheduler,
        max_grad_norm=opt.max_grad_norm,
        bf16=hw.bf16,
        use_cpu=hw.num_gpus == 0,
        gradient_checkpointing=hw.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=hw.dataloader_num_workers,
        dataloader_pin_memory=hw.dataloader_pin_memory,
        accelerator_config={"non_blocking": hw.dataloader_pin_memory and hw.num_gpus > 0},
        # batches of similar length: little padding (the ``length`` column is the sequence's token count)
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        length_column_name="length",
        save_strategy="epoch",
        logging_steps=cfg.logger.logging_steps,
        logging_nan_inf_filter=False,  # the check reads every batch's loss on the host: a sync per batch
        logging_first_step=True,
        report_to=report_to(cfg),
        seed=cfg.seed,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the collator enforces model.max_length
        ddp_find_unused_parameters=False,
        ddp_timeout=4 * 3600,  # the other ranks wait while rank 0 runs the per-epoch evaluation
    )


@dataclass
class Prepared:
    """Everything a training run needs before its Trainer exists (:func:`prepare`)."""

    model: Any
    tokenizer: Any
    feature_extractor: Any
    model_path: str
    questions: dict[str, Question]
    train_dataset: Any
    collator: PronunciationCollator
    audio_table: torch.Tensor | None
    adapter_tensors_loaded: int
    audio_cache_note: str
    audio_cache_s: float | None = None  # seconds the one-off audio embedding pass took
    data_problems: list[str] = field(default_factory=list)  # what data.on_bad=skip left out


def load_model(cfg: DictConfig, device: torch.device | str = "cpu") -> tuple[Any, Any, Any, str, int]:
    """(model with the speech LoRA, tokenizer, feature extractor, model path, adapter tensors loaded), exactly as
    training uses them: native layout checked (``load_base_model``), the tokenizer's audio token checked against the
    model's config, and with ``train_audio_encoder`` the audio encoder and its speech projection trainable and saved
    with the adapter."""
    model_path = resolve_model_path(cfg.model)
    revision = None if Path(model_path).is_dir() else cfg.model.revision
    # the model first, as inference loads it: its native-layout check is the first read of the checkpoint, so a hub
    # out of reach or the remote-code layout stops there, before any weights load
    model = load_base_model(model_path, revision, getattr(torch, cfg.model.dtype), cfg.hardware.attn_implementation)
    tokenizer, feature_extractor = load_tokenizer_and_features(model_path, revision)
    audio_token_id(tokenizer, model.config)
    extra = list(AUDIO_MODULES) if cfg.train_audio_encoder else None  # PEFT trains and saves copies of these
    model, n_loaded = attach_speech_lora(model, cfg.lora, model_path, revision, modules_to_save=extra)
    # PEFT upcasts LoRA weights only: Unfreeze's modules_to_save copies would train in bf16, where an Adam update of
    # about the learning rate (2e-5) is below half a bf16 step of most weights and rounds away. Every trained
    # parameter gets float32 master weights (autocast still multiplies in bf16); the frozen ones keep model.dtype.
    cast_mixed_precision_params(model, getattr(torch, cfg.model.dtype))
    return model.to(device), tokenizer, feature_extractor, model_path, n_loaded


def prepare(cfg: DictConfig, device: torch.device | str = "cpu") -> Prepared:
    """Model, processing, the training split (one row per recording and question, with length keys), its collator,
    and the cached audio embeddings where the audio encoder is frozen."""
    questions = questions_from_config(cfg.task)
    recordings = load_split(cfg.data.path, cfg.data.train_split, cfg.data.revision, cfg.data.max_train_samples)
    skip = OnBad(cfg.data.on_bad) is OnBad.skip
    recordings, problems = checked(recordings, cfg.data.min_seconds, cfg.data.max_seconds, skip)  # before the model
    if problems:
        log.warning("data.on_bad=skip: %d problems, those utterances left out, e.g. %s", len(problems), problems[:3])
    model, tokenizer, feature_extractor, model_path, n_loaded = load_model(cfg, device)
    collator = PronunciationCollator(tokenizer, feature_extractor, questions, max_length=cfg.model.max_length)
    train_ds = with_lengths(expand_questions(recordings, list(questions)), collator.num_tokens)
    columns = (train_ds[c] for c in ("id", "question", "length"))
    too_long = [(u, q, n) for u, q, n in zip(*columns, strict=True) if n > cfg.model.max_length]
    if too_long:  # all of them at once, before the first step
        raise ValueError(
            f"{len(too_long)} training samples exceed model.max_length={cfg.model.max_length} tokens (audio + prompt + "
            f"answer), e.g. {too_long[:5]} (utterance, question, tokens): raise model.max_length or drop those "
            "recordings."
        )
    audio_table, note, cache_s = None, "off (hardware.cache_audio_embeddings=false)", None
    if cfg.train_audio_encoder:
        note = "off: train_audio_encoder=true trains the audio encoder, so its embeddings change at every step"
        log.info("audio embeddings not cached: %s", note)
    elif cfg.hardware.cache_audio_embeddings:
        batch = cfg.eval.batch_size or cfg.hardware.per_device_eval_batch_size
        start = time.perf_counter()
        cached = cache_audio_embeddings(model, train_ds, collator, batch, cfg.hardware.dataloader_num_workers)
        cache_s = time.perf_counter() - start
        note = "on" if cached else f"off: {unsupported_reason(model.config)}"
        if cached:
            train_ds, collator, audio_table = cached
    if cfg.hardware.compile:
        n = compile_layers(model, audio=audio_table is None)
        log.info("compiled %d layers (the first steps compile them)", n)
    if cfg.train_audio_encoder and cfg.hardware.checkpoint_audio_encoder:  # around the compiled layers, if compiled
        n = checkpoint_audio_layers(model, kept=cfg.hardware.audio_layers_kept)
        log.info("audio encoder: %d layers recomputed in the backward", n)
    return Prepared(
        model=model,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        model_path=model_path,
        questions=questions,
        train_dataset=train_ds,
        collator=collator,
        audio_table=audio_table,
        adapter_tensors_loaded=n_loaded,
        audio_cache_note=note,
        audio_cache_s=cache_s,
        data_problems=problems,  # empty unless data.on_bad=skip (else checked() raised)
    )


def build_trainer(
    cfg: DictConfig, prepared: Prepared, args: SFTConfig, callbacks: list | None = None
) -> PronunciationTrainer:
    """The Trainer that ``python -m phi4_pron.train`` runs (the benchmark and ``phi4_pron.check`` use it too)."""
    return PronunciationTrainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.train_dataset,
        data_collator=prepared.collator,
        processing_class=prepared.tokenizer,
        callbacks=callbacks,
        audio_table=prepared.audio_table,
    )


def task_record(cfg: DictConfig) -> dict[str, Any]:
    """The task as saved beside every adapter (``task.json``): evaluate and assess ask the same questions."""
    return OmegaConf.to_container(cfg.task, resolve=True)


def cpp_compiler(hw: DictConfig) -> str | None:
    """The C++ compiler that builds the compiled layers' kernel launchers (``hardware.compile_cpp_wrapper``), None
    where the settings use none; a clear error where none is found."""
    if not (hw.compile and hw.compile_cpp_wrapper):
        return None
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise RuntimeError(
            f"hardware.compile_cpp_wrapper=true builds the compiled layers' kernel launchers with a C++ compiler: {e}. "
            "Install g++ (apt-get install g++, or conda install gxx), name another with the CXX environment "
            "variable, or train with hardware.compile_cpp_wrapper=false (Inductor's Python wrapper, slower steps)."
        ) from e


def compile_settings(hw: DictConfig) -> contextlib.AbstractContextManager:
    """Inductor's settings for the layers that training compiles (they compile at the first steps, inside
    ``trainer.train``; per-epoch evaluation runs them eagerly), scoped to training. The C++ wrapper's compiler is
    looked for here, before the model loads."""
    if cpp_compiler(hw) is None:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(cpp_wrapper=True)


def run_training(cfg: DictConfig, run_dir: Path | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train one configuration in ``run_dir`` (default: Hydra's output folder), with extra Trainer ``callbacks``
    (the benchmark's timer); returns the final training metrics. The folder is locked for the job, and a checkpoint
    in it is resumed only if it was trained with these settings (checked before the model loads)."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    with run_folder_lock(run_dir):
        resume = resume_checkpoint(cfg, run_dir)
        return _train(cfg, run_dir, resume, callbacks)


def _train(cfg: DictConfig, run_dir: Path, resume: str | None, callbacks: list | None) -> dict[str, Any]:
    if cfg.hardware.num_gpus > 0 and not torch.cuda.is_available():
        raise SettingError(
            f"hardware={cfg.hardware.name} trains on {cfg.hardware.num_gpus} GPU(s), but torch {torch.__version__} "
            "finds none (a CPU-only build of torch, or no CUDA device visible): install a CUDA build of torch "
            "(README.md, 'Real model, real data'), or train on the CPU with hardware=cpu."
        )
    world_size = dist.world_size()
    if cfg.hardware.num_gpus > 1 and world_size != cfg.hardware.num_gpus:
        log.warning(
            "hardware=%s is for %d GPUs but %d process(es) run: launch with torchrun --nproc_per_node %d "
            "(gradient accumulation follows the processes, the effective batch stays %d)",
            cfg.hardware.name,
            cfg.hardware.num_gpus,
            world_size,
            cfg.hardware.num_gpus,
            cfg.optim.effective_batch_size,
        )
    set_seed(cfg.seed)
    args = sft_config(cfg, run_dir, world_size)
    compiling = compile_settings(cfg.hardware)
    prepared = prepare(cfg, args.device)
    model, tokenizer, feature_extractor = prepared.model, prepared.tokenizer, prepared.feature_extractor
    adapter = adapter_summary(model)
    log.info(
        "%s: %d trainable parameters of %d (%.3f%%)",
        cfg.lora.name,
        adapter["trainable_params"],
        adapter["total_params"],
        100 * adapter["trainable_share"],
    )

    init = LoraInit(cfg.lora.init)
    model_path = prepared.model_path
    record = {
        "config_name": cfg.run_name,
        "description": cfg.lora.description,
        "experiment": cfg.experiment_name,
        "model": {"name_or_path": model_path, "revision": cfg.model.revision, "dtype": cfg.model.dtype},
        "task": {"name": cfg.task.name, "questions": list(prepared.questions)},
        "speech_lora": {
            "init": init.value,
            "source": f"{model_path}/{cfg.lora.adapter_subfolder}"
            if init is LoraInit.pretrained
            else "fresh initialisation",
            "tensors_loaded": prepared.adapter_tensors_loaded,
            **adapter,
        },
        "vision_lora": vision_lora_summary(model_path, cfg.lora),
        "train_audio_encoder": cfg.train_audio_encoder,
        "trainable_params": adapter["trainable_params"],
        "trainable_share": adapter["trainable_share"],
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "world_size": world_size,
        "train_samples": len(prepared.train_dataset),
        "audio_embeddings_cached": prepared.audio_table is not None,
        "audio_embeddings_cache": prepared.audio_cache_note,
        "audio_embeddings_cache_s": prepared.audio_cache_s,
        "data": {
            "path": cfg.data.path,
            "train_split": cfg.data.train_split,
            "skipped_problems": len(prepared.data_problems),
            "problems": prepared.data_problems[:100],
        },
        "training_arguments": args.to_dict(),
        "phi4_pron_version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if dist.is_main_process():  # one writer per run folder
        write_json_atomic(run_dir / "training_config.json", record)

    tb = tensorboard_callback(cfg, run_dir)
    wandb_name, wandb_group = wandb_identity(cfg.run_name)
    wandb_run = start_wandb(cfg, run_dir, job_type="train", name=wandb_name, group=wandb_group)
    task = task_record(cfg)
    trainer = build_trainer(
        cfg, prepared, args, [EpochCheckpointCallback(task), *([tb] if tb else []), *(callbacks or [])]
    )
    eval_cb = None
    if cfg.eval.every_epoch:
        eval_ds = load_split(cfg.data.path, cfg.data.eval_split, cfg.data.revision, cfg.eval.limit)
        eval_cb = EpochEvalCallback(
            trainer,
            tokenizer,
            feature_extractor,
            prepared.questions,
            eval_ds,
            run_dir,
            batch_size=cfg.eval.batch_size or cfg.hardware.per_device_eval_batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            tb_writer=tb.tb_writer if tb else None,
            info=task_info(cfg.task, cfg.train_audio_encoder),
        )
        trainer.add_callback(eval_cb)
    try:
        if eval_cb is not None and cfg.eval.before_training and resume is None and trainer.is_world_process_zero():
            eval_cb.evaluate(model, epoch=0, step=0)  # the paper's epoch 0: the starting adapter, untrained
        with compiling:
            result = trainer.train(resume_from_checkpoint=resume)
        if trainer.is_world_process_zero():
            final = run_dir / "final_model"
            trainer.model.save_pretrained(final)
            tokenizer.save_pretrained(final)
            feature_extractor.save_pretrained(final)
            write_json_atomic(final / TASK_FILE, task)
        metrics = dict(result.metrics)
        finish_wandb(wandb_run, {f"train/{k}": v for k, v in metrics.items()})
        if trainer.is_world_process_zero():
            print(learning_summary(trainer.state.log_history, eval_cb.last if eval_cb else None))
        return metrics
    except BaseException:
        finish_wandb(wandb_run, exit_code=1)  # the W&B run shows the job failed
        raise
    finally:
        release(trainer)


def learning_summary(log_history: list[dict], last_eval: dict | None) -> str:
    """One line that says whether the run learned: first and last logged training loss, and how many of the last
    evaluation's recordings got a parseable answer."""
    losses = [h["loss"] for h in log_history if "loss" in h]
    text = f"learning check: training loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "learning check:"
    if last_eval:
        n = last_eval["n_utterances"]
        ok = n - last_eval["n_failed"] - last_eval["n_unparseable"]
        text += f"; last evaluation: {ok}/{n} recordings answered in a parseable form"
    return text


def release(trainer: PronunciationTrainer) -> None:
    """Free the model, optimizer, cached audio embeddings and accelerator memory so the next job of a sweep starts
    clean."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = trainer.audio_table = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
