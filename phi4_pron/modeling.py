"""Load Phi-4-multimodal as it is published: native transformers classes, safetensors only.

The published checkpoint, as a user downloads it: the native layout is the hub revision ``refs/pr/70`` (``main`` is the
remote-code layout, ``model_type: phi4mm``, which the native classes cannot read); the audio placeholder is the
tokenizer's ``audio_token`` (``<|endoftext11|>``, id 200011). Each is checked here, before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer

from phi4_pron.config import HUB_MODEL_ID, NATIVE_REVISION

NATIVE_MODEL_TYPE = "phi4_multimodal"


class ModelPathError(FileNotFoundError):
    """The model folder, hub id or its files cannot be used as they are; the message says what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """A local checkpoint folder or a hub id, checked before any download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelPathError(
                f"model folder {path} has no config.json: point model.name_or_path at the folder "
                "holding the checkpoint's config.json and *.safetensors files."
            )
        return str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelPathError(
            f"model.name_or_path={name_or_path!r} does not exist. Give a local checkpoint folder or a "
            f"hub id such as {HUB_MODEL_ID}."
        )
    return name_or_path


def checkpoint_file(path: str, filename: str, revision: str | None = None, subfolder: str | None = None) -> Path:
    """One file of a checkpoint: from the local folder, or downloaded from the hub at ``revision``."""
    local = Path(path).expanduser()
    if local.is_dir():
        file = local / (subfolder or "") / filename
        if not file.exists():
            raise ModelPathError(
                f"{file} is missing: the checkpoint folder {local} lacks {subfolder or '.'}/{filename}."
            )
        return file
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(path, filename, subfolder=subfolder, revision=revision))
    except (LocalEntryNotFoundError, ConnectionError) as e:  # offline (or HF_HUB_OFFLINE) and not in the cache
        raise ModelPathError(
            f"{path} at revision {revision} cannot be read: {filename} is neither reachable on the Hugging Face Hub "
            f"nor in its cache ({type(e).__name__}). Without a connection, download the checkpoint where there is "
            f"one,\n    {download_hint(revision or NATIVE_REVISION)}\n"
            "and set model.name_or_path=Phi-4-multimodal-instruct (the folder)."
        ) from e


def download_hint(revision: str = NATIVE_REVISION) -> str:
    return f"hf download {HUB_MODEL_ID} --revision {revision} --local-dir Phi-4-multimodal-instruct"


def check_native_layout(path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json``; a remote-code layout stops here, before any weights load."""
    config_file = checkpoint_file(path, "config.json", revision)
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type != NATIVE_MODEL_TYPE or "auto_map" in config:
        where = f"{path} at revision {revision}" if not Path(path).expanduser().is_dir() else str(path)
        raise ModelPathError(
            f"{where} is not the native transformers layout of Phi-4-multimodal: {config_file} says "
            f"model_type={model_type!r}{' with an auto_map (remote code)' if 'auto_map' in config else ''}, "
            f"and this project loads {NATIVE_MODEL_TYPE!r} with the native Phi4MultimodalForCausalLM (no "
            f"trust_remote_code). The hub's main branch is the remote-code layout; the native files are revision "
            f"{NATIVE_REVISION}. Use model.revision={NATIVE_REVISION} with the hub id, or download them:\n    "
            f"{download_hint()}\nand set model.name_or_path=Phi-4-multimodal-instruct."
        )
    return config


def load_tokenizer_and_features(path: str, revision: str | None = None):
    """The tokenizer and the audio feature extractor (the image processor is not needed for speech)."""
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    feature_extractor = AutoFeatureExtractor.from_pretrained(path, revision=revision)
    return tokenizer, feature_extractor


def tokenizer_audio_token_id(tokenizer) -> int:
    """The tokenizer's own audio placeholder (``extra_special_tokens.audio_token``: ``<|endoftext11|>`` in the real
    checkpoint)."""
    token_id = getattr(tokenizer, "audio_token_id", None)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            "the tokenizer names no audio placeholder (extra_special_tokens.audio_token in tokenizer_config.json): "
            f"is this the native Phi-4-multimodal tokenizer? Load the hub's revision {NATIVE_REVISION} "
            f"({download_hint()})."
        )
    return token_id


def audio_token_id(tokenizer, model_config: Any) -> int:
    """The tokenizer's audio placeholder id, checked against the model's ``config.audio_config.audio_token_id``: a
    mismatch means tokenizer and model come from different checkpoints."""
    token_id = tokenizer_audio_token_id(tokenizer)
    expected = model_config.audio_config.audio_token_id
    if token_id != expected:
        raise ModelPathError(
            f"the tokenizer's audio token {tokenizer.audio_token!r} is id {token_id}, the model's "
            f"config.audio_config.audio_token_id is {expected}: tokenizer and model come from different checkpoints. "
            "Load both from one folder."
        )
    return token_id


def load_base_model(path: str, revision: str | None, dtype: torch.dtype, attn_implementation: str):
    """The base checkpoint (native layout checked first, safetensors only), for training and inference alike."""
    check_native_layout(path, revision)
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
    )


def active_module(module):
    """The module that runs: a PEFT modules_to_save wrapper's trained copy, or the module itself."""
    copies = getattr(module, "modules_to_save", None)
    return copies[module.active_adapters[0]] if copies else module


def audio_encoder(model):
    """The audio conformer encoder that runs (the trained copy under ``train_audio_encoder``)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return active_module(base.model.embed_tokens_extend.audio_embed.encoder)
