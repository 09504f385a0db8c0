"""Whole jobs under faults, through the real entrypoint: a run interrupted and resumed, or evaluated along the way,
trains the same adapter as one that was not."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_cli


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final_model" / "adapter_model.safetensors")


@pytest.mark.slow
def test_evaluation_and_resume_leave_training_bit_identical(tmp_path):
    """Per-epoch evaluation restores RNG state and train mode: a run with it trains the same adapter as one without;
    a run killed after epoch 1 and resumed trains the same adapter as the uninterrupted one."""
    import torch

    common = [
        "-m",
        "phi4_pron.train",
        "experiment=smoke",
        "optim.epochs=2",
        "data.max_train_samples=8",
        "eval.limit=2",
        "eval.max_new_tokens=4",
        "logger=none",
    ]
    with_eval, without_eval, resumed = tmp_path / "with_eval", tmp_path / "without_eval", tmp_path / "resumed"
    run_cli([*common, f"hydra.run.dir={with_eval}"])
    run_cli([*common, f"hydra.run.dir={without_eval}", "eval.every_epoch=false"])
    shutil.copytree(with_eval, resumed)
    shutil.rmtree(resumed / "checkpoint-epoch-2")  # killed during epoch 2
    shutil.rmtree(resumed / "final_model")
    run_cli([*common, f"hydra.run.dir={resumed}"])
    reference = _adapter(with_eval)
    for other in (without_eval, resumed):
        adapter = _adapter(other)
        assert adapter.keys() == reference.keys()
        assert all(torch.equal(adapter[k], reference[k]) for k in reference), other.name
