"""Load Phi-4-multimodal as it is published (native transformers classes, safetensors only) and put a LoRA on it.

The published checkpoint, as a user downloads it: the native layout is the hub revision ``refs/pr/70`` (``main`` is the
remote-code layout, ``model_type: phi4mm``, which the native classes cannot read); the audio placeholder is the
tokenizer's ``audio_token`` (``<|endoftext11|>``, id 200011); ``speech-lora/`` stores its tensors without PEFT's
``base_model.model.`` prefix. Every one of these is checked here, before training starts.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.checkpoint import checkpoint
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
    Phi4MultimodalAudioConformerEncoderLayer,
    Phi4MultimodalAudioConvModule,
)

from phi4_pron.collator import tokenizer_audio_token_id
from phi4_pron.config import HUB_MODEL_ID, NATIVE_REVISION, REPO_ROOT, LoraInit
from phi4_pron.tiny_model import ensure_tiny_checkpoint

log = logging.getLogger(__name__)

NATIVE_MODEL_TYPE = "phi4_multimodal"
PEFT_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before every key; the published files lack it
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# "Unfreeze" (train_audio_encoder): the audio encoder and its speech projection, trained and saved with the adapter
# (PEFT's modules_to_save: names matched at the end of module paths; the vision-speech projection is not used)
AUDIO_MODULES = ("audio_embed.encoder", "audio_embed.up_proj_for_speech", "audio_embed.down_proj_for_speech")


class ModelPathError(FileNotFoundError):
    """The model folder, hub id or its files cannot be used as they are; the message says what to do."""


class AdapterLoadError(ValueError):
    """An adapter file whose tensors do not all land in the model (or do not fill it); names the keys."""


def resolve_model_path(model_cfg: Any) -> str:
    """A local folder (building the tiny checkpoint if asked) or the hub id, checked before any download."""
    path = Path(model_cfg.name_or_path).expanduser()
    if model_cfg.build_tiny:
        if path.is_dir() and not (path / "TINY_MODEL.json").exists() and not (path / "config.json").exists():
            raise ModelPathError(
                f"model.name_or_path={path} is a folder without a checkpoint (no config.json) and not one this "
                "project built: remove it (the tiny model is built there), or point model.name_or_path elsewhere."
            )
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
            f"hub id such as {HUB_MODEL_ID}."
        )
    return name


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


def audio_token_id(tokenizer, model_config: Any) -> int:
    """The tokenizer's own audio placeholder id (``collator.tokenizer_audio_token_id``), checked against the model's
    ``config.audio_config.audio_token_id``: a mismatch means tokenizer and model come from different checkpoints."""
    token_id = tokenizer_audio_token_id(tokenizer)
    expected = model_config.audio_config.audio_token_id
    if token_id != expected:
        raise ModelPathError(
            f"the tokenizer's audio token {tokenizer.audio_token!r} is id {token_id}, the model's "
            f"config.audio_config.audio_token_id is {expected}: tokenizer and model come from different checkpoints. "
            "Load both from one folder."
        )
    return token_id


def keep_sdpa_off_cudnn() -> None:
    """SDPA's cuDNN attention builds a new plan for each new sequence length (about 2 ms of CPU per layer call on an
    H100, measured: the GPU waits), and lengths change with every batch and every decoding step; the flash and
    memory-efficient kernels do not."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_base_model(path: str, revision: str | None, dtype: torch.dtype, attn_implementation: str):
    """The base checkpoint (native layout checked first, safetensors only), for training and inference alike."""
    check_native_layout(path, revision)
    keep_sdpa_off_cudnn()
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
    )


def load_lora_weights(model: PeftModel, file: Path, fresh_modules: tuple[str, ...] = ()) -> int:
    """Put every tensor of an adapter file into ``model``'s adapter; returns how many.

    Keys with or without PEFT's prefix are accepted (the published ``speech-lora/`` has none, a PEFT-saved adapter
    has it). A file tensor with no place in the model, a model adapter tensor the file lacks, a shape mismatch, or a
    value that did not land is an error naming the keys: a partly loaded adapter would train as a fresh one.
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


def mark_sizes_static(*tensors: torch.Tensor) -> None:
    """Have a graph compiled with dynamic shapes take each (batch, tokens, ...) tensor's sizes after the first two as
    the constants they are.

    With ``dynamic=True`` every input size is a symbol unless something fixes it, and nothing fixes the rotary
    embedding's width (cos and sin: 96 of Phi-4's 128 head dims): its slices then start at symbolic offsets, which
    the compiled kernels cannot prove aligned (experiments/benchmarks/train.md, "The rotary width")."""
    for t in tensors:
        for dim in range(2, t.dim()):
            torch._dynamo.mark_static(t, dim)


class TokenMajorConvModule(Phi4MultimodalAudioConvModule):
    """Phi-4's conformer convolution module computed on (batch, time, channels) throughout: its 1x1 convolutions as
    matrix products and its causal depthwise convolution as the sum of ``kernel_size`` shifted products. The same
    arithmetic and parameters (tests/test_trainer.py compares outputs and gradients), but no convolution for Inductor
    to lower: its lowering of a convolution's backward fixes the time length as a constant (torch 2.13:
    ``convolution_backward_lowering`` guards the input gradient's strides), so each new audio length recompiled the
    compiled conformer layers, until Dynamo's recompile limit (8) left every later length to run them uncompiled.
    :func:`compile_layers` gives this class to the modules it compiles (one class, so one guard for every layer)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        glu, dw, pw, out_conv = self.glu, self.dw_sep_conv_1d.dw_conv, self.dw_sep_conv_1d.pw_conv, self.ext_pw_conv_1d
        linear = torch.nn.functional.linear
        h = linear(self.layer_norm(hidden_states), glu.ext_pw_conv_1d.weight[..., 0], glu.ext_pw_conv_1d.bias)
        d = glu.output_dim
        h = (h[..., :d] + glu.b1[0, :, 0]) * glu.glu_act(h[..., d : 2 * d] + glu.b2[0, :, 0])
        k, steps = dw.kernel_size[0], h.shape[1]
        weight = dw.weight[:, 0, :].to(h.dtype)  # (channels, k): output t sees inputs t-k+1 .. t
        padded = torch.nn.functional.pad(h, (0, 0, k - 1, 0))
        h = sum(padded[:, j : j + steps] * weight[:, j] for j in range(k)) + dw.bias.to(h.dtype)
        h = linear(h, pw.weight[..., 0], pw.bias)
        return self.dropout(linear(self.act(h), out_conv.weight[..., 0], out_conv.bias))


def compile_layers(model, audio: bool = True) -> int:
    """Compile each decoder layer and (``audio``) each audio conformer layer in place; returns how many.

    The decoder layers share one graph (the audio layers two for each of their classes, kept and
    :class:`RecomputedConformerLayer`: the first takes bf16, the others the fp32 of a layer norm under autocast),
    compiled with dynamic shapes at the first step, so no later batch length recompiles them (batches are padded to a
    multiple of 8, so their alignment never changes either); only the batch and its length are symbols in them (the
    rotary width made static: :func:`mark_sizes_static`). The conformer layers' convolution modules run token-major
    (:class:`TokenMajorConvModule`), so no audio length recompiles those either. The input embeddings are made to
    require grad, so that the first layer's input is of the same kind as the others' (else it needs graphs of its
    own).
    Parameter names, checkpoints and the saved adapter are unchanged.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.enable_input_require_grads()
    base.model.rotary_emb.register_forward_hook(lambda _module, _args, cos_sin: mark_sizes_static(*cos_sin))
    conformers = list(audio_encoder(model).encoders) if audio else []
    for layer in conformers:
        dw = layer.conv.dw_sep_conv_1d.dw_conv  # token-major needs one filter a channel (depthwise_multiplier 1)
        if dw.groups == dw.in_channels == dw.out_channels:  # as published
            layer.conv.__class__ = TokenMajorConvModule
    for layer in [*base.model.layers, *conformers]:
        layer.compile(dynamic=True)
    for layer in conformers:
        layer._compiled_call_impl = functools.partial(_with_static_heads, layer._compiled_call_impl)
    return len(base.model.layers) + len(conformers)


def _with_static_heads(call, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A compiled conformer layer's call, its (batch, heads, time, time) attention mask's head count made static.

    Else a batch as large as the head count (16 of Phi-4's, so the h100 preset's) takes the heads' symbol (Dynamo's
    duck sizing) and the attention's broadcast against the query's constant 16 heads fixes the batch: the epoch's
    last, smaller micro-batch recompiled every conformer graph (experiments/benchmarks/train.md, "Unfreeze's last
    step")."""
    torch._dynamo.mark_static(attention_mask, 1)
    return call(hidden_states, attention_mask)


def checkpoint_audio_layers(model, kept: int = 0) -> int:
    """Recompute each audio conformer layer's activations in the backward instead of keeping them (Unfreeze's
    trained encoder; transformers checkpoints only the decoder layers), all but the last ``kept`` layers
    (``hardware.audio_layers_kept``): they become :class:`RecomputedConformerLayer`; returns how many."""
    layers = audio_encoder(model).encoders
    recomputed = layers[: max(len(layers) - kept, 0)]  # as many kept as there are layers: none recomputed
    for layer in recomputed:
        layer.__class__ = RecomputedConformerLayer
    return len(recomputed)


class RecomputedConformerLayer(Phi4MultimodalAudioConformerEncoderLayer):
    """A conformer layer checkpointed from inside its forward: the same parameters and outputs, its activations
    recomputed in the backward. A layer that :func:`compile_layers` compiled so holds the checkpoint in its compiled
    region, whose backward recomputes the forward itself. Checkpointed from outside, the backward called the compiled
    forward once more, through Dynamo's guards and the compiled function's wrappers: host work that Unfreeze's
    host-bound steps pay as GPU idle time (experiments/benchmarks/train.md, "The checkpoint inside the compiled
    layers"). One class, so the recomputed layers share their compiled graphs. The layers have no dropout
    (``dropout_rate`` 0), so the recomputation is exact."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        forward = Phi4MultimodalAudioConformerEncoderLayer.forward
        return checkpoint(forward, self, hidden_states, attention_mask, use_reentrant=False)


def active_module(module):
    """The module that runs: a PEFT modules_to_save wrapper's trained copy, or the module itself."""
    copies = getattr(module, "modules_to_save", None)
    return copies[module.active_adapters[0]] if copies else module


def audio_encoder(model):
    """The audio conformer encoder that runs (the trained copy under ``train_audio_encoder``)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return active_module(base.model.embed_tokens_extend.audio_embed.encoder)


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
