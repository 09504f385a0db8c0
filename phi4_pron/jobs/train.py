"""The job behind ``python -m phi4_pron.train``: one configuration trained in its run folder, in steps:

run_training          lock the folder, choose the checkpoint to resume (or move an older run aside) before anything
                      loads, write .hydra/, then:
  _check_devices      a GPU preset needs a GPU
  prepare             both splits (checked before the model loads), model + speech LoRA, samples with token counts,
                      the audio cache, the compiled layers
  _write_record       training_config.json (with the run's id, which its checkpoints carry)
  _setup_trainer      the Trainer with its checkpoint, logging and evaluation callbacks
  _fit                epoch 0's evaluation (or, resumed, the evaluations a kill lost), training, final_model/
"""

from __future__ import annotations

import gc
import json
import logging
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
from phi4_pron.adapters import AUDIO_MODULES, adapter_summary, attach_speech_lora, vision_lora_summary
from phi4_pron.answer import TASK_FILE, Question, questions_from_config, task_info
from phi4_pron.audio_cache import cache_audio_embeddings, unsupported_reason
from phi4_pron.callbacks import EpochCheckpointCallback, EpochEvalCallback
from phi4_pron.collator import PronunciationCollator
from phi4_pron.config import REPO_ROOT, LoraInit, SettingError
from phi4_pron.data import expand_questions, load_checked, with_lengths
from phi4_pron.fast.attention import sdpa_without_cudnn
from phi4_pron.fast.layers import (
    checkpoint_audio_layers,
    compile_layers,
    compile_settings,
    compiler_caches,
    cpp_compiler,
)
from phi4_pron.modeling import ModelPathError, audio_token_id, load_base_model, load_tokenizer_and_features
from phi4_pron.modeling import resolve_model_path as resolve_path
from phi4_pron.results import replaced_folder, write_json_atomic, write_text_atomic
from phi4_pron.run_folder import RUN_RECORD, RUN_STAMP, new_run_id, resume_checkpoint, run_folder_lock, stamped_run_id
from phi4_pron.sweep import wandb_identity
from phi4_pron.table3 import write_table3
from phi4_pron.tiny_model import TINY_MARKER, ensure_tiny_checkpoint
from phi4_pron.tracking import finish_wandb, start_wandb, tensorboard_callback
from phi4_pron.trainer import PronunciationTrainer, sft_config

log = logging.getLogger(__name__)


def run_training(cfg: DictConfig, run_dir: Path | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train one configuration in ``run_dir`` (default: Hydra's output folder), with extra Trainer ``callbacks``
    (the benchmark's timer); returns the final training metrics. The folder is locked for the job, and a checkpoint
    in it is resumed only if it was trained with these settings (checked before the model loads)."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    with run_folder_lock(run_dir):
        resume = resume_checkpoint(cfg, run_dir)
        run_id = stamped_run_id(run_dir) if resume else new_run_id()
        _write_hydra_config(cfg, run_dir)
        return _train(cfg, run_dir, resume, run_id, callbacks)


def _write_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/`` (config, overrides, Hydra's own settings), written only once the folder is this job's: Hydra's own
    writing is off (``hydra.output_subdir: null``) so that a refused job leaves a running or finished run's alone."""
    if not HydraConfig.initialized() or not dist.is_main_process():
        return
    hydra = HydraConfig.get()
    folder = run_dir / ".hydra"
    settings = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(settings))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(list(hydra.overrides.task)))
    write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra}))


def _train(cfg: DictConfig, run_dir: Path, resume: str | None, run_id: str, callbacks: list | None) -> dict[str, Any]:
    _check_devices(cfg)
    set_seed(cfg.seed)
    world_size = dist.world_size()
    try:
        args = sft_config(cfg, run_dir, world_size)
    except ValueError as e:  # TrainingArguments' own checks: an optimizer or scheduler it does not know, ...
        raise SettingError(
            f"optim.optimizer={cfg.optim.optimizer!r} / optim.lr_scheduler={cfg.optim.lr_scheduler!r}: {e}"
        ) from None
    cpp_compiler(cfg.hardware)  # a missing C++ compiler is named before the model loads
    with compiler_caches(cfg.hardware, cfg.cache_dir), sdpa_without_cudnn():
        prepared = prepare(cfg, args.device)
        _write_record(cfg, run_dir, prepared, args, world_size, run_id)
        trainer, eval_cb, wandb_run = _setup_trainer(cfg, run_dir, prepared, args, run_id, callbacks)
        try:
            metrics = _fit(cfg, run_dir, prepared, trainer, eval_cb, resume)
            finish_wandb(wandb_run, {f"train/{k}": v for k, v in metrics.items()})
        except BaseException:
            finish_wandb(wandb_run, exit_code=1)  # the W&B run shows the job failed
            raise
        finally:
            release(trainer)
    return metrics


def _check_devices(cfg: DictConfig) -> None:
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


def model_path(model_cfg: Any) -> str:
    """The checkpoint a run loads: a local folder or hub id, or the tiny checkpoint, built there on first use."""
    if not model_cfg.build_tiny:
        return resolve_path(model_cfg.name_or_path)
    path = Path(model_cfg.name_or_path).expanduser()
    if path.is_dir() and not (path / TINY_MARKER).exists() and not (path / "config.json").exists():
        raise ModelPathError(
            f"model.name_or_path={path} is a folder without a checkpoint (no config.json) and not one this "
            "project built: remove it (the tiny model is built there), or point model.name_or_path elsewhere."
        )
    return str(ensure_tiny_checkpoint(path, REPO_ROOT / "data" / "speechocean762-mini"))


def load_model(cfg: DictConfig, device: torch.device | str = "cpu") -> tuple[Any, Any, Any, str, int]:
    """(model with the speech LoRA, tokenizer, feature extractor, model path, adapter tensors loaded), exactly as
    training uses them: native layout checked, the tokenizer's audio token checked against the model's config, and
    with ``train_audio_encoder`` the audio encoder and its speech projection trainable and saved with the adapter."""
    path = model_path(cfg.model)
    revision = None if Path(path).is_dir() else cfg.model.revision
    # the model first: its native-layout check is the first read of the checkpoint, so a hub out of reach or the
    # remote-code layout stops there, before any weights load
    model = load_base_model(path, revision, getattr(torch, cfg.model.dtype), cfg.hardware.attn_implementation)
    tokenizer, feature_extractor = load_tokenizer_and_features(path, revision)
    audio_token_id(tokenizer, model.config)
    extra = list(AUDIO_MODULES) if cfg.train_audio_encoder else None  # PEFT trains and saves copies of these
    model, n_loaded = attach_speech_lora(model, cfg.lora, path, revision, modules_to_save=extra)
    # PEFT upcasts LoRA weights only: Unfreeze's modules_to_save copies would train in bf16, where an Adam update of
    # about the learning rate (2e-5) is below half a bf16 step of most weights and rounds away. Every trained
    # parameter gets float32 master weights (autocast still multiplies in bf16); the frozen ones keep model.dtype.
    cast_mixed_precision_params(model, getattr(torch, cfg.model.dtype))
    return model.to(device), tokenizer, feature_extractor, path, n_loaded


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
    eval_dataset: Any = None  # the evaluation split, checked (eval.every_epoch)
    eval_problems: list[str] = field(default_factory=list)


def prepare(cfg: DictConfig, device: torch.device | str = "cpu") -> Prepared:
    """Model, processing, the training split (one row per recording and question, with length keys), its collator,
    the cached audio embeddings where the audio encoder is frozen, and the compiled layers."""
    questions = questions_from_config(cfg.task)
    recordings, problems, eval_dataset, eval_problems = _setup_data(cfg)
    model, tokenizer, feature_extractor, path, n_loaded = load_model(cfg, device)
    collator = PronunciationCollator(tokenizer, feature_extractor, questions, max_length=cfg.model.max_length)
    train_ds = _setup_samples(cfg, recordings, questions, collator)
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
    _setup_fast_path(cfg, model, audio_cached=audio_table is not None)
    return Prepared(
        model=model,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        model_path=path,
        questions=questions,
        train_dataset=train_ds,
        collator=collator,
        audio_table=audio_table,
        adapter_tensors_loaded=n_loaded,
        audio_cache_note=note,
        audio_cache_s=cache_s,
        data_problems=problems,  # empty unless data.on_bad=skip (else checked() raised)
        eval_dataset=eval_dataset,
        eval_problems=eval_problems,
    )


def _setup_data(cfg: DictConfig):
    """The training split's recordings and the evaluation split's (when evaluating), every problem found before the
    model loads: (train, its problems, eval or None, its problems)."""
    recordings, problems = load_checked(cfg.data, cfg.data.train_split, cfg.data.max_train_samples)
    if problems:
        log.warning("data.on_bad=skip: %d problems, those utterances left out, e.g. %s", len(problems), problems[:3])
    test, test_problems = None, []
    if cfg.eval.every_epoch:  # its recordings' audio is decoded at evaluation: one that fails there is counted
        test, test_problems = load_checked(cfg.data, cfg.data.eval_split, cfg.eval.limit, audio=False)
        if test_problems:
            log.warning("%s split: %d problems: %s", cfg.data.eval_split, len(test_problems), test_problems[:3])
    return recordings, problems, test, test_problems


def _setup_samples(cfg: DictConfig, recordings, questions: dict[str, Question], collator: PronunciationCollator):
    """One sample per recording and question, with its token count; every too-long one named before the first step."""
    train_ds = with_lengths(expand_questions(recordings, list(questions)), collator.num_tokens)
    columns = (train_ds[c] for c in ("id", "question", "length"))
    too_long = [(u, q, n) for u, q, n in zip(*columns, strict=True) if n > cfg.model.max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} training samples exceed model.max_length={cfg.model.max_length} tokens (audio + prompt + "
            f"answer), e.g. {too_long[:5]} (utterance, question, tokens): raise model.max_length or drop those "
            "recordings."
        )
    return train_ds


def _setup_fast_path(cfg: DictConfig, model, audio_cached: bool) -> None:
    """Compiled layers (``hardware.compile``; the audio layers too where their embeddings are not cached), and
    Unfreeze's audio layers recomputed in the backward (inside the compiled regions, if compiled)."""
    if cfg.hardware.compile:
        n = compile_layers(model, audio=not audio_cached)
        log.info("compiled %d layers (the first steps compile them)", n)
    if cfg.train_audio_encoder and cfg.hardware.checkpoint_audio_encoder:
        n = checkpoint_audio_layers(model, kept=cfg.hardware.audio_layers_kept)
        log.info("audio encoder: %d layers recomputed in the backward", n)


def _write_record(
    cfg: DictConfig, run_dir: Path, prepared: Prepared, args: SFTConfig, world_size: int, run_id: str
) -> dict:
    """``training_config.json``: what was trained (model, adapters, task, data), how, and how many parameters; the
    run's id, which its checkpoints carry."""
    adapter = adapter_summary(prepared.model)
    log.info(
        "%s: %d trainable parameters of %d (%.3f%%)",
        cfg.lora.name,
        adapter["trainable_params"],
        adapter["total_params"],
        100 * adapter["trainable_share"],
    )
    init, path = LoraInit(cfg.lora.init), prepared.model_path
    record = {
        "run_id": run_id,
        "config_name": cfg.run_name,
        "description": cfg.lora.description,
        "experiment": cfg.experiment_name,
        "model": {"name_or_path": path, "revision": cfg.model.revision, "dtype": cfg.model.dtype},
        "task": {"name": cfg.task.name, "questions": list(prepared.questions)},
        "speech_lora": {
            "init": init.value,
            "source": f"{path}/{cfg.lora.adapter_subfolder}" if init is LoraInit.pretrained else "fresh initialisation",
            "tensors_loaded": prepared.adapter_tensors_loaded,
            **adapter,
        },
        "vision_lora": vision_lora_summary(path, cfg.lora),
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
            "eval_split": cfg.data.eval_split,
            "eval_problems": prepared.eval_problems[:100],
        },
        "training_arguments": args.to_dict(),
        "phi4_pron_version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if dist.is_main_process():  # one writer per run folder
        write_json_atomic(run_dir / RUN_RECORD, record)
    return record


def _setup_trainer(
    cfg: DictConfig, run_dir: Path, prepared: Prepared, args: SFTConfig, run_id: str, callbacks: list | None
):
    """(Trainer, per-epoch evaluation callback or None, W&B run or None)."""
    tb = tensorboard_callback(cfg, run_dir)
    wandb_name, wandb_group = wandb_identity(cfg.run_name)
    wandb_run = start_wandb(cfg, run_dir, job_type="train", name=wandb_name, group=wandb_group)
    task = OmegaConf.to_container(cfg.task, resolve=True)  # saved beside every adapter (task.json)
    checkpoints = EpochCheckpointCallback(task, run_id, cfg.keep_optimizer_states)
    trainer = build_trainer(prepared, args, [checkpoints, *([tb] if tb else []), *(callbacks or [])])
    eval_cb = None
    if cfg.eval.every_epoch:
        eval_cb = EpochEvalCallback(
            trainer,
            prepared.tokenizer,
            prepared.feature_extractor,
            prepared.questions,
            prepared.eval_dataset,
            run_dir,
            batch_size=cfg.eval.batch_size or cfg.hardware.per_device_eval_batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            tb_writer=tb.tb_writer if tb else None,
            info=task_info(cfg.task, cfg.train_audio_encoder),
            compiled=cfg.hardware.compile if cfg.eval.compile is None else cfg.eval.compile,
            resamples=cfg.eval.bootstrap,
            log_audio=cfg.logger.wandb.log_audio,
        )
        trainer.add_callback(eval_cb)
    return trainer, eval_cb, wandb_run


def build_trainer(prepared: Prepared, args: SFTConfig, callbacks: list | None = None) -> PronunciationTrainer:
    """The Trainer that ``python -m phi4_pron.train`` runs (the benchmark uses it too)."""
    return PronunciationTrainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.train_dataset,
        data_collator=prepared.collator,
        processing_class=prepared.tokenizer,
        callbacks=callbacks,
        audio_table=prepared.audio_table,
    )


def _fit(cfg, run_dir: Path, prepared: Prepared, trainer, eval_cb, resume: str | None) -> dict[str, Any]:
    """Epoch 0's evaluation (a fresh run, ``eval.before_training``), training, ``final_model/`` and the run's
    ``table3.md``."""
    main = trainer.is_world_process_zero()
    if eval_cb is not None and cfg.eval.before_training and resume is None and main:
        eval_cb.evaluate(prepared.model, epoch=0, step=0)  # the paper's epoch 0: the starting adapter, untrained
    if eval_cb is not None and resume is not None and main:
        _evaluate_missing(run_dir, Path(resume), prepared.model, eval_cb)
    with compile_settings(cfg.hardware):
        result = trainer.train(resume_from_checkpoint=resume)
    if main:
        with replaced_folder(run_dir / "final_model") as final:  # whole or not at all
            trainer.model.save_pretrained(final)
            prepared.tokenizer.save_pretrained(final)
            prepared.feature_extractor.save_pretrained(final)
            write_json_atomic(final / TASK_FILE, OmegaConf.to_container(cfg.task, resolve=True))
        if eval_cb is not None:
            write_table3(run_dir)
        print(learning_summary(trainer.state.log_history, eval_cb.last if eval_cb else None))
    return dict(result.metrics)


def _evaluate_missing(run_dir: Path, resume: Path, model, eval_cb: EpochEvalCallback) -> None:
    """Evaluate this run's checkpoints up to the resumed one that have no evaluation (a job killed while it ran),
    each with its own adapter weights; training then loads the resumed checkpoint's as it always does."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    stamp = (resume / RUN_STAMP).read_text() if (resume / RUN_STAMP).exists() else None
    last = json.loads((resume / "trainer_state.json").read_text())["global_step"]
    for ckpt in sorted(run_dir.glob("checkpoint-epoch-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
        mine = (ckpt / RUN_STAMP).read_text() == stamp if (ckpt / RUN_STAMP).exists() else stamp is None
        if step > last or not mine or (run_dir / "eval" / ckpt.name / "metrics.json").exists():
            continue
        log.warning("%s has no evaluation (its job was stopped): evaluating it now", ckpt.name)
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        eval_cb.evaluate(model, epoch=int(ckpt.name.rsplit("-", 1)[1]), step=step)


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
