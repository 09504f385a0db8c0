"""Whole jobs under faults, through the real entrypoint: a run interrupted and resumed, or evaluated along the way,
trains the same adapter as one that was not."""

from __future__ import annotations

import shutil

import pytest
import torch
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


@pytest.mark.slow
def test_a_folder_never_mixes_two_runs_and_a_lost_evaluation_is_made_on_resume(tmp_path):
    """The first run's epoch-2 evaluation lost to a kill is made when it is resumed; a second run started over in the
    folder (resume=false, another lr) moves the first aside, and resuming the second takes only its own checkpoint."""
    import json

    from safetensors.torch import load_file

    run = tmp_path / "run"
    job = ["-m", "phi4_pron.train", "experiment=smoke", "logger=none", "data.max_train_samples=4", "eval.limit=2"]
    first = [*job, "optim.epochs=2", f"hydra.run.dir={run}"]
    run_cli(first)
    # keep_optimizer_states=1: the older checkpoint keeps its adapter (evaluable), not its optimizer state
    assert (run / "checkpoint-epoch-2" / "optimizer.pt").exists() and not (
        run / "checkpoint-epoch-1" / "optimizer.pt"
    ).exists()
    assert (run / "checkpoint-epoch-1" / "adapter_model.safetensors").exists()
    shutil.rmtree(run / "eval" / "checkpoint-epoch-2")  # killed while evaluating epoch 2
    proc = run_cli(first)
    assert "checkpoint-epoch-2 has no evaluation" in proc.stdout
    assert json.loads((run / "eval" / "checkpoint-epoch-2" / "metrics.json").read_text())["epoch"] == 2
    first_id = json.loads((run / "training_config.json").read_text())["run_id"]

    second = [*job, "optim.epochs=1", "optim.lr=1e-3", f"hydra.run.dir={run}"]
    run_cli([*second, "resume=false"])
    (aside,) = run.glob("previous-*")
    assert (aside / "checkpoint-epoch-2").is_dir() and not (run / "checkpoint-epoch-2").exists()
    assert not (run / "eval" / "checkpoint-epoch-2").exists()
    assert "checkpoint-epoch-2" not in (run / "table3.md").read_text()
    record = json.loads((run / "training_config.json").read_text())
    assert record["run_id"] != first_id and record["config"]["optim"]["lr"] == 1e-3
    assert (run / ".hydra" / "overrides.yaml").read_text().count("optim.lr=1e-3") == 1

    proc = run_cli(second)
    assert f"resuming from {run / 'checkpoint-epoch-1'}" in proc.stdout
    ckpt = load_file(run / "checkpoint-epoch-1" / "adapter_model.safetensors")
    assert all(torch.equal(ckpt[k], v) for k, v in _adapter(run).items())
