"""The Trainer a job runs (TRL's SFTTrainer with fewer host syncs and the flash kernel in training) and its
arguments from the settings."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import DistributedDataParallelKwargs
from omegaconf import DictConfig
from trl import SFTConfig, SFTTrainer

from phi4_pron.audio_cache import AUDIO_ROWS, embed_from_table


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


def sft_config(cfg: DictConfig, run_dir: Path, world_size: int) -> SFTConfig:
    """TrainingArguments of a run: the optimizer, the hardware preset, one checkpoint an epoch in ``run_dir``."""
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
        report_to=["wandb"] if cfg.logger.wandb.enabled else [],  # TensorBoard: its own callback, writing to logs/
        seed=cfg.seed,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the collator enforces model.max_length
        ddp_find_unused_parameters=False,
        ddp_timeout=4 * 3600,  # the other ranks wait while rank 0 runs the per-epoch evaluation
    )


class PronunciationTrainer(SFTTrainer):
    """SFTTrainer whose training loss is TRL's (answer tokens only, through its fused LM head), computed faster.

    - Per-batch metrics (entropy, token accuracy, token count) are read only when logged. TRL converts them with
      ``.item()`` after every forward: each conversion makes the CPU wait for the GPU to finish the forward
      before it launches the backward, so the GPU then waits for the CPU. Here each batch's sums stay on the
      device and are gathered and averaged at logging time, into the same log keys and values.
    - Right-padded batches (the training collator's) go to the model without their padding mask: causal
      attention alone keeps every real token from seeing the padding after it, so the loss and gradients are
      the same, and SDPA can take its flash kernel instead of the masked memory-efficient one.
    - With ``audio_table`` (``phi4_pron.audio_cache``), batches name the cached audio embeddings' rows instead of
      carrying features: the model gets token embeddings with those rows at the audio placeholders.
    - Under DDP the gradients are views into DDP's all-reduce buckets (``gradient_as_bucket_view``): without it DDP
      keeps a second copy of every trainable gradient, 2 GiB for Unfreeze's float32 audio encoder.
    - Less host work between micro-batches, which a host-bound step (Unfreeze) pays as GPU idle time: the Trainer
      walks the whole model (about 2800 modules at full size) twice before each, once to put it in training mode
      and once to count its parameters for ``total_flos``. Here the mode is set only when some module is not
      training, and the count is taken once.
    Anything else (evaluation, label smoothing, custom losses) goes to TRL unchanged.
    """

    def __init__(self, *args, audio_table: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.audio_table = audio_table
        self._batch_sums: list[torch.Tensor] = []  # per batch: answer tokens, entropy sum, top-1 hits, input tokens
        self._flos_params: int | None = None  # the model's non-embedding parameters, counted once
        self._model_modules: tuple[torch.nn.Module, list[torch.nn.Module]] | None = None  # (model, all its modules)

    def floating_point_ops(self, inputs: dict) -> int:
        key = getattr(self.model, "main_input_name", "input_ids")
        if key not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._flos_params is None:
            self._flos_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[key].numel() * self._flos_params  # the Trainer's estimate

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._model_modules is None or self._model_modules[0] is not model:
            self._model_modules = (model, list(model.modules()))
        if not all(m.training for m in self._model_modules[1]):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train = lambda mode=True: model  # every module is training: the Trainer's model.train() need not walk
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del model.train

    def _build_accelerator_args(self, **kwargs) -> dict:
        args = super()._build_accelerator_args(**kwargs)
        for handler in args.get("kwargs_handlers", []):
            if isinstance(handler, DistributedDataParallelKwargs):
                handler.gradient_as_bucket_view = True
        return args

    def _plain_loss(self, return_outputs: bool) -> bool:
        return (
            self.model.training
            and not return_outputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if AUDIO_ROWS in inputs:
            inputs = embed_from_table(self.model, inputs, self.audio_table)
        if not self._plain_loss(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        right_padded = getattr(self.data_collator, "padding_side", None) == "right"
        model_inputs = {k: v for k, v in inputs.items() if not (right_padded and k == "attention_mask")}
        outputs = model(**model_inputs, use_cache=False, fused_lm_head=True)
        n_answer = outputs.label_mask.sum()
        n_tokens = n_answer if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(n_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the token count is global
        sums = [n_answer, outputs.entropy.detach().sum(), outputs.is_top1.sum(), inputs["attention_mask"].sum()]
        self._batch_sums.append(torch.stack([s.float() for s in sums]))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._batch_sums and self.model.training:
            local = torch.stack(self._batch_sums)
            self._batch_sums.clear()
            n_answer, entropy, hits, n_input = (
                self.accelerator.gather(local).view(-1, *local.shape).sum(0).T.tolist()
            )  # summed over processes, batch by batch, as TRL sums them
            metrics = self._metrics["train"]
            metrics["entropy"] += [e / n if n > 0 else 0.0 for e, n in zip(entropy, n_answer, strict=True)]
            metrics["mean_token_accuracy"] += [h / n if n > 0 else 0.0 for h, n in zip(hits, n_answer, strict=True)]
            self._total_train_tokens += int(sum(n_input)) // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)
