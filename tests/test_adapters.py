"""phi4_pron.adapters: the published speech-lora/ (keys without PEFT's prefix) and PEFT's own layout load whole, or
not at all."""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from phi4_pron.adapters import AdapterLoadError, attach_speech_lora

R320 = OmegaConf.create(
    {"init": "pretrained", "adapter_subfolder": "speech-lora", "r": 320, "alpha": 640, "dropout": 0.0}
)


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.mark.parametrize("prefixed", [False, True])
def test_r320_loads_every_tensor_of_the_file_in_either_key_layout(tiny_model_dir, tmp_path, prefixed):
    """The published layout (no prefix) and PEFT's own (``base_model.model.``): every value lands, B non-zero."""
    src = tiny_model_dir
    if prefixed:
        src = tmp_path / "ckpt"
        shutil.copytree(tiny_model_dir, src)
        file = src / "speech-lora" / "adapter_model.safetensors"
        save_file({f"base_model.model.{k}": v for k, v in load_file(file).items()}, file)
    expected = load_file(tiny_model_dir / "speech-lora" / "adapter_model.safetensors")
    model, n = attach_speech_lora(_base(tiny_model_dir), R320, str(src))
    assert n == len(expected) == 16
    params = dict(model.named_parameters())
    for key, value in expected.items():
        placed = params[f"base_model.model.{key.replace('.weight', '.default.weight')}"]
        assert torch.equal(placed.detach(), value) and placed.requires_grad
        if "lora_B" in key:
            assert value.abs().sum() > 0


def test_an_adapter_that_does_not_fit_is_an_error(tiny_model_dir, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, src)
    file = src / "speech-lora" / "adapter_model.safetensors"
    state = load_file(file)
    state["model.layers.7.self_attn.qkv_proj.lora_A.weight"] = state.pop(
        "model.layers.1.self_attn.qkv_proj.lora_A.weight"
    )
    save_file(state, file)
    with pytest.raises(AdapterLoadError, match=r"1 without a place .*layers\.7.* 1 missing .*layers\.1"):
        attach_speech_lora(_base(tiny_model_dir), R320, str(src))
