"""phi4_pron.tiny_model: the stand-in checkpoint copies the published layout, as a user downloads it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file


def test_tiny_checkpoint_copies_the_published_layout(tiny_model_dir, tiny_processing):
    tokenizer, _ = tiny_processing
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "phi4_multimodal" and "auto_map" not in config
    assert (tiny_model_dir / "model.safetensors.index.json").exists()  # sharded, as the real one
    assert (tokenizer.audio_token, tokenizer.image_token) == ("<|endoftext11|>", "<|endoftext10|>")
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|end|>"])
    assert config["eos_token_id"] == ids and config["audio_config"]["audio_token_id"] == tokenizer.audio_token_id
    assert "<|audio|>" not in tokenizer.get_vocab()
    keys = load_file(tiny_model_dir / "speech-lora" / "adapter_model.safetensors")
    assert len(keys) == 16 and all(k.startswith("model.layers.") for k in keys)  # no base_model.model. prefix
    adapter = json.loads((tiny_model_dir / "speech-lora" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (320, 640, 0.01)
    assert adapter["target_modules"] == r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"


def test_building_the_tiny_checkpoint_leaves_the_callers_random_state(tmp_path):
    """A run that builds the checkpoint (a fresh cache) draws the same random numbers after it as one that finds
    it built: a fresh machine's first ``make smoke`` otherwise trained differently from the next (0/8 vs 8/8)."""
    from transformers import set_seed

    from phi4_pron.tiny_model import build_tiny_checkpoint

    set_seed(7)
    expected = torch.rand(4)
    set_seed(7)
    build_tiny_checkpoint(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "TINY_MODEL.json").exists()
    assert torch.equal(torch.rand(4), expected)
