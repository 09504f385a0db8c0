"""The published checkpoint's layout, as a user downloads it: native revision, the tokenizer's own audio token, the
speech-lora/ key layout without PEFT's prefix; and the pre-flight ``phi4_pron.check``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from phi4_pron.modeling import AdapterLoadError, ModelPathError, attach_speech_lora, check_native_layout

R320 = OmegaConf.create(
    {"init": "pretrained", "adapter_subfolder": "speech-lora", "r": 320, "alpha": 640, "dropout": 0.0}
)


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


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


@pytest.mark.slow  # a subprocess
def test_a_remote_code_layout_stops_before_any_weights_load(tiny_model_dir, tmp_path):
    src = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="phi4mm", auto_map={"AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelPathError, match=r"(?s)model_type='phi4mm'.*refs/pr/70.*hf download microsoft/Phi-4"):
        check_native_layout(str(src))
    proc = run_cli(
        ["-m", "phi4_pron.check", "experiment=smoke", f"model.name_or_path={src}", "model.build_tiny=false"],
        check=False,
    )
    assert proc.returncode == 1 and "[FAIL] checkpoint layout" in proc.stdout and "hf download" in proc.stdout


def test_a_tokenizer_without_the_models_audio_token_is_refused(tiny_model_dir, tiny_processing):
    from transformers import AutoConfig

    from phi4_pron.modeling import audio_token_id

    tokenizer, _ = tiny_processing
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert audio_token_id(tokenizer, config) == config.audio_config.audio_token_id
    config.audio_config.audio_token_id += 1
    with pytest.raises(ModelPathError, match="different checkpoints"):
        audio_token_id(tokenizer, config)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("lora", ["r64", "r320"])
def test_check_passes_on_the_tiny_checkpoint(lora):
    compiled = ["hardware.compile=true", "hardware.compile_cpp_wrapper=true"] if lora == "r320" else []
    proc = run_cli(["-m", "phi4_pron.check", "experiment=smoke", f"lora={lora}", *compiled])
    assert proc.stdout.count("[ ok ]") == 6 and "all checks passed" in proc.stdout
    assert ("builds the compiled layers' kernel launchers" in proc.stdout) == (lora == "r320")
    assert ("16 tensors loaded from speech-lora/" in proc.stdout) == (lora == "r320")
