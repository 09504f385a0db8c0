"""Load Phi-4-multimodal (native transformers classes, safetensors only) and put the speech LoRA on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer

from phi4_pron.config import REPO_ROOT, LoraInit
from phi4_pron.tiny_model import ensure_tiny_checkpoint

log = logging.getLogger(__name__)


class ModelPathError(FileNotFoundError):
    """The model folder or hub id cannot be used; the message says what to do."""


def resolve_model_path(model_cfg: Any) -> str:
    """A local folder (building the tiny checkpoint if asked) or the hub id, checked before any download."""
    path = Path(model_cfg.name_or_path).expanduser()
    if model_cfg.build_tiny:
        return str(ensure_tiny_checkpoint(path, REPO_ROOT / "data" / "speechocean762-mini"))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelPathError(
                f"model folder {path} has no config.json: point model.name_or_path at the folder "
                "holding the checkpoint's config.json and *.safetensors files."
            )
        return str(path)
    name = model_cfg.name_or_path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelPathError(
            f"model.name_or_path={name!r} does not exist. Give a local checkpoint folder or a "
            "hub id such as microsoft/Phi-4-multimodal-instruct."
        )
    return name


def load_tokenizer_and_features(path: str, revision: str | None = None):
    """The tokenizer and the audio feature extractor (the image processor is not needed for speech)."""
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    feature_extractor = AutoFeatureExtractor.from_pretrained(path, revision=revision)
    return tokenizer, feature_extractor


def keep_sdpa_off_cudnn() -> None:
    """SDPA's cuDNN attention builds a new plan for each new sequence length (about 2 ms of CPU per layer call on an
    H100, measured: the GPU waits), and lengths change with every batch and every decoding step; the flash and
    memory-efficient kernels do not."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_base_model(path: str, revision: str | None, dtype: torch.dtype, attn_implementation: str):
    """The base checkpoint (safetensors only), for training and for inference alike."""
    keep_sdpa_off_cudnn()
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
    )


def attach_speech_lora(model, lora_cfg: Any, path: str, revision: str | None = None) -> PeftModel:
    """The trainable speech adapter: the checkpoint's own (``init=pretrained``) or a fresh one."""
    if LoraInit(lora_cfg.init) is LoraInit.pretrained:
        peft_cfg = PeftConfig.from_pretrained(path, subfolder=lora_cfg.adapter_subfolder, revision=revision)
        if (peft_cfg.r, peft_cfg.lora_alpha) != (lora_cfg.r, lora_cfg.alpha):
            log.warning(
                "%s/%s has r=%s alpha=%s, the config says r=%s alpha=%s: the checkpoint's values are used",
                path,
                lora_cfg.adapter_subfolder,
                peft_cfg.r,
                peft_cfg.lora_alpha,
                lora_cfg.r,
                lora_cfg.alpha,
            )
        peft_cfg.lora_dropout = lora_cfg.dropout
        peft_cfg.inference_mode = False
        return PeftModel.from_pretrained(
            model, path, subfolder=lora_cfg.adapter_subfolder, revision=revision, config=peft_cfg, is_trainable=True
        )
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def compile_layers(model, audio: bool = True) -> int:
    """Compile each decoder layer and (``audio``) each frozen audio conformer layer in place; returns how many.

    The decoder layers share one graph (the audio layers two: the first takes bf16, the others the fp32 of a layer
    norm under autocast), compiled with dynamic shapes at the first step, so no later batch length recompiles
    them (batches are padded to a multiple of 8, so their alignment never changes either). The input
    embeddings are made to require grad, so that the first layer's input is of the same kind as the others'
    (else it needs graphs of its own).
    Parameter names, checkpoints and the saved adapter are unchanged.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.enable_input_require_grads()
    layers = [*base.model.layers, *(base.model.embed_tokens_extend.audio_embed.encoder.encoders if audio else [])]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


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
    local = Path(path) / "vision-lora" / "adapter_config.json"
    if local.exists():
        cfg = json.loads(local.read_text())
        summary.update(r=cfg["r"], alpha=cfg["lora_alpha"])
    return summary
