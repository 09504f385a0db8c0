"""The speech LoRA: attached fresh or read from an adapter folder (the published ``speech-lora/`` or a PEFT-saved
one), every tensor checked to have landed, and summarised for the run's record.

The published ``speech-lora/`` stores its tensors without PEFT's ``base_model.model.`` prefix; both layouts are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from phi4_pron.config import LoraInit
from phi4_pron.modeling import checkpoint_file

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before every key; the published files lack it
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# "Unfreeze" (train_audio_encoder): the audio encoder and its speech projection, trained and saved with the adapter
# (PEFT's modules_to_save: names matched at the end of module paths; the vision-speech projection is not used)
AUDIO_MODULES = ("audio_embed.encoder", "audio_embed.up_proj_for_speech", "audio_embed.down_proj_for_speech")


class AdapterLoadError(ValueError):
    """An adapter file whose tensors do not all land in the model (or do not fill it); names the keys."""


def load_lora_weights(model: PeftModel, file: Path, fresh_modules: tuple[str, ...] = ()) -> int:
    """Put every tensor of an adapter file into ``model``'s adapter; returns how many.

    A file tensor with no place in the model, a model adapter tensor the file lacks, a shape mismatch, or a value
    that did not land is an error naming the keys: a partly loaded adapter would train as a fresh one.
    """
    from safetensors.torch import load_file

    state = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in load_file(file).items()}
    current = get_peft_model_state_dict(model)
    # modules added to train (modules_to_save) that the file predates start from the base weights
    fresh = {k: v for k, v in current.items() if any(f".{m}." in k for m in fresh_modules)}
    expected = {k: v for k, v in current.items() if k not in fresh}
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    wrong_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if unexpected or missing or wrong_shape:
        raise AdapterLoadError(
            f"{file} does not fit the model's LoRA ({len(state)} tensors in the file, {len(expected)} in the model): "
            f"{len(unexpected)} without a place (e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:3]}). Is it this checkpoint's adapter?"
        )
    set_peft_model_state_dict(model, {**fresh, **state})
    loaded = get_peft_model_state_dict(model)
    differ = [k for k, v in state.items() if not torch.equal(loaded[k].cpu(), v.to(loaded[k].dtype))]
    if differ:
        raise AdapterLoadError(f"{file}: {len(differ)} tensors did not land in the model, e.g. {differ[:3]}.")
    return len(state)


def attach_lora_from(
    model,
    path: str,
    subfolder: str | None = None,
    revision: str | None = None,
    dropout: float | None = None,
    modules_to_save: list[str] | None = None,
) -> tuple[PeftModel, int]:
    """An adapter folder (local or hub, published or PEFT-saved layout) on ``model``: (PEFT model, tensors loaded).

    r, alpha, target modules and saved modules are the file's; ``dropout`` replaces the file's when given (training),
    ``modules_to_save`` adds modules to train (the file's must then not have its own).
    """
    file_cfg = json.loads(checkpoint_file(path, ADAPTER_CONFIG, revision, subfolder).read_text())
    peft_cfg = LoraConfig(
        r=file_cfg["r"],
        lora_alpha=file_cfg["lora_alpha"],
        lora_dropout=file_cfg.get("lora_dropout", 0.0) if dropout is None else dropout,
        target_modules=file_cfg["target_modules"],
        modules_to_save=file_cfg.get("modules_to_save") or modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_cfg, revision=revision)
    fresh = () if file_cfg.get("modules_to_save") else tuple(modules_to_save or ())
    n = load_lora_weights(peft_model, checkpoint_file(path, ADAPTER_WEIGHTS, revision, subfolder), fresh)
    return peft_model, n


def attach_speech_lora(
    model, lora_cfg: Any, path: str, revision: str | None = None, modules_to_save: list[str] | None = None
) -> tuple[PeftModel, int]:
    """The trainable speech adapter: the checkpoint's own (``init=pretrained``) or a fresh one; and how many of its
    tensors came from the checkpoint (0 for a fresh one). ``modules_to_save`` train alongside (and save with) it."""
    if LoraInit(lora_cfg.init) is LoraInit.pretrained:
        peft_model, n = attach_lora_from(
            model, path, lora_cfg.adapter_subfolder, revision, dropout=lora_cfg.dropout, modules_to_save=modules_to_save
        )
        cfg = peft_model.peft_config["default"]
        if (cfg.r, cfg.lora_alpha) != (lora_cfg.r, lora_cfg.alpha):
            log.warning(
                "%s/%s has r=%s alpha=%s, the config says r=%s alpha=%s: the checkpoint's values are used",
                path,
                lora_cfg.adapter_subfolder,
                cfg.r,
                cfg.lora_alpha,
                lora_cfg.r,
                lora_cfg.alpha,
            )
        log.info("speech LoRA: %d tensors loaded from %s/%s", n, path, lora_cfg.adapter_subfolder)
        return peft_model, n
    peft_cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg, revision=revision), 0


def adapter_summary(model: PeftModel) -> dict[str, Any]:
    """The adapter's actual settings and the exact trainable parameter count and share."""
    trainable, total = model.get_nb_trainable_parameters()
    cfg = model.peft_config["default"]
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
    return {
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target_modules": target,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
    }


def vision_lora_summary(path: str, lora_cfg: Any) -> dict[str, Any]:
    """The vision LoRA as the checkpoint ships it (read locally when possible); frozen and not loaded."""
    summary = {
        "r": lora_cfg.vision.r,
        "alpha": lora_cfg.vision.alpha,
        "trainable": lora_cfg.vision.trainable,
        "loaded": False,
        "note": "speech inputs never use the vision LoRA",
    }
    local = Path(path) / "vision-lora" / ADAPTER_CONFIG
    if local.exists():
        cfg = json.loads(local.read_text())
        summary.update(r=cfg["r"], alpha=cfg["lora_alpha"])
    return summary
