"""phi4_pron.modeling: the checkpoint as published (native revision, the tokenizer's own audio token), and model paths
that cannot be used, each named before any weights load."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli

from phi4_pron.modeling import ModelPathError, check_native_layout


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


def test_model_path_that_does_not_exist(tmp_path):
    from omegaconf import OmegaConf

    from phi4_pron.jobs.train import model_path
    from phi4_pron.modeling import ModelPathError

    cfg = OmegaConf.create({"name_or_path": str(tmp_path / "no-model"), "build_tiny": False})
    with pytest.raises(ModelPathError, match="no-model.* does not exist"):
        model_path(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="has no config.json"):
        model_path(OmegaConf.create({"name_or_path": str(tmp_path / "empty"), "build_tiny": False}))
    hub = OmegaConf.create({"name_or_path": "microsoft/Phi-4-multimodal-instruct", "build_tiny": False})
    assert model_path(hub) == "microsoft/Phi-4-multimodal-instruct"


def test_an_empty_model_folder_is_named_not_built_over(tmp_path):
    from omegaconf import OmegaConf

    from phi4_pron.jobs.train import model_path
    from phi4_pron.modeling import ModelPathError

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("not a checkpoint")
    cfg = OmegaConf.create({"name_or_path": str(tmp_path / "model"), "build_tiny": True})
    with pytest.raises(ModelPathError, match="without a checkpoint \\(no config.json\\)"):
        model_path(cfg)
