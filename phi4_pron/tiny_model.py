"""Build a tiny random-weight Phi-4-multimodal checkpoint offline, in the real checkpoint's layout.

The folder it writes looks like ``microsoft/Phi-4-multimodal-instruct``: ``config.json`` +
``model.safetensors``, ``generation_config.json``, the tokenizer and feature extractor files, and a
``speech-lora/`` (r 320 / alpha 640) and ``vision-lora/`` (r 256 / alpha 512) PEFT adapter, so the
project's real loading code reads it unchanged. Everything is seeded: two builds give the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# Bump when the builder changes: the cache folder name carries it, so a stale build is never reused.
TINY_MODEL_VERSION = "v1"

SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|image|>", "<|audio|>"]
LORA_TARGET_MODULES = r".*model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def _training_text(corpus_dir: Path | None) -> list[str]:
    """Text the tiny BPE is trained on: the answer format's keys and the corpus's words and phones."""
    lines = [
        '{"accuracy": 8, "fluency": 9, "prosodic": 7, "total": 8, "transcript": "", "phones": "",'
        ' "mispronunciations": []}',
        "Assess the pronunciation of this recording.",
    ]
    if corpus_dir is not None and (corpus_dir / "resource" / "lexicon.txt").exists():
        lines += (corpus_dir / "resource" / "lexicon.txt").read_text().splitlines()
    return lines


def build_tokenizer(corpus_dir: Path | None = None, vocab_size: int = 320, extra_text: Sequence[str] = ()):
    """A byte-level BPE tokenizer (``vocab_size`` tokens) with Phi-4's chat and modality special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_training_text(corpus_dir), *extra_text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        model_max_length=4096,
    )


def build_config(tokenizer):
    """A ~0.4M-parameter Phi4MultimodalConfig with the real model's structure."""
    from transformers import Phi4MultimodalConfig

    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75},
        bos_token_id=eos_id,
        eos_token_id=[eos_id, end_id],
        pad_token_id=eos_id,
        tie_word_embeddings=True,
        audio_config={
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_blocks": 2,
            "num_attention_heads": 4,
            "ext_pw_out_channel": 64,
            "depthwise_separable_out_channel": 64,
            "nemo_conv_channels": 64,
            "audio_token_id": tokenizer.convert_tokens_to_ids("<|audio|>"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_token_id": tokenizer.convert_tokens_to_ids("<|image|>"),
        },
    )


def _save_adapter(model, out_dir: Path, r: int, alpha: int, seed: int) -> None:
    """Save a LoRA adapter with non-zero weights, as a pretrained one would have."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.01, target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # restore the plain base modules


def build_tiny_checkpoint(out_dir: str | Path, corpus_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (atomically: a half-built folder never appears)."""
    from transformers import GenerationConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tokenizer = build_tokenizer(Path(corpus_dir) if corpus_dir else None)
        config = build_config(tokenizer)
        torch.manual_seed(seed)
        model = Phi4MultimodalForCausalLM(config).to(torch.float32).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Phi4MultimodalFeatureExtractor().save_pretrained(tmp)
        _save_adapter(model, tmp / "speech-lora", r=320, alpha=640, seed=seed + 1)
        _save_adapter(model, tmp / "vision-lora", r=256, alpha=512, seed=seed + 2)
        (tmp / "TINY_MODEL.json").write_text(json.dumps({"version": TINY_MODEL_VERSION, "seed": seed}))
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_tiny_checkpoint(out_dir: str | Path, corpus_dir: str | Path | None = None) -> Path:
    """Return ``out_dir``, building the tiny checkpoint there first if it is missing."""
    out_dir = Path(out_dir).expanduser()
    if not (out_dir / "TINY_MODEL.json").exists():
        build_tiny_checkpoint(out_dir, corpus_dir)
    return out_dir
