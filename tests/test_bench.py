"""The benchmark runs the framework's own training (its rows are `phi4_pron.train` commands), and the fast path
(cached audio embeddings, batch 32 x 2, sdpa, no checkpointing) trains the same model as the original recipe (eager,
checkpointing, batch 8 x 8, the audio encoder in every step), on the tiny model (CPU, fp32)."""

from __future__ import annotations

import json
import shlex

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_fast_path_trains_the_same_model_and_rows_reproduce(tmp_path):
    out = tmp_path / "out"
    run_cli(["-m", "phi4_pron.bench", "check", "--tiny", "--root", str(tmp_path / "bench"), "--out", str(out)])
    result = json.loads((out / "check.json").read_text())
    original, fast = result["rows"]
    assert len(original["losses"]) == len(fast["losses"]) == 2
    # fp32 on a CPU: the two paths reorder sums (attention kernels, accumulation 8 vs 2, cached vs live audio), about
    # 1e-6 relative. Adam divides each gradient element by its own size, so the adapters' updates differ more
    # (4e-4 measured); a wrong batch, label or audio row moves the loss by percents.
    assert result["summary"]["max_loss_rel_diff"] < 1e-4
    assert result["summary"]["update_rel_diff"] < 1e-2
    assert result["summary"]["update_rel_size"] > 1e-3  # the adapters did move

    # the row's printed command, run as a user would, trains to the same losses
    command = shlex.split(fast["command"])
    assert command[:3] == ["python", "-m", "phi4_pron.train"]
    run_dir = tmp_path / "again"
    run_cli(["-m", "phi4_pron.train", *command[3:], f"hydra.run.dir={run_dir}"])
    state = json.loads(next(run_dir.glob("checkpoint-epoch-*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses == pytest.approx(fast["losses"], rel=1e-5)


@pytest.mark.slow
def test_floor_times_the_epoch_that_training_runs(tmp_path):
    """``bench floor`` takes its micro-batches from the same epoch a training row runs: as many, of the same tokens
    (the Unfreeze row, which also runs the audio encoder, at its batch of 8)."""
    root, out = str(tmp_path / "bench"), tmp_path / "out"
    run_cli(
        [
            "-m",
            "phi4_pron.bench",
            "floor",
            "--tiny",
            "--only",
            "frozen",
            "r64",
            "unfreeze-batch-8",
            "--root",
            root,
            "--out",
            str(out),
        ]
    )
    run_cli(["-m", "phi4_pron.bench", "train", "--tiny", "--only", "h100-r64", "--root", root, "--out", str(out)])
    frozen, lora, unfreeze = json.loads((out / "floor.json").read_text())["rows"]
    (train,) = json.loads((out / "train.json").read_text())["rows"]
    assert unfreeze["audio"] and unfreeze["micro_batches"] == train["samples_per_epoch"] // 8
    for row in (frozen, lora, unfreeze):
        assert row["micro_batches"] * (8 if row is unfreeze else 16) == train["samples_per_epoch"]
        assert row["tokens_per_sample"] == pytest.approx(train["tokens_per_sample"], abs=0.05)
        assert 0 <= row["padding_share"] < 0.2 and row["epoch_s"] > 0
    assert lora["lora"] == "r64" and "lora=r64" in lora["command"]


@pytest.mark.slow
def test_epoch_rows_time_every_step_after_the_compiling_ones(tmp_path):
    """``bench train --epoch``: the row trains its first epoch and times every step after its ``warmup`` ones; the
    epoch figure scales that wall by the samples of the epoch over those of the timed steps."""
    import math

    from phi4_pron.bench.__main__ import TINY_AFTER, TINY_BASE
    from phi4_pron.bench.measure import train_row

    overrides = [*TINY_BASE, *TINY_AFTER, "optim.effective_batch_size=16", "hardware.per_device_train_batch_size=4"]
    row = train_row(overrides, warmup=1, steps=-1, run_dir=tmp_path / "run")
    assert row["samples_per_epoch"] == 64 and row["timed"] == "steps 2-4 (to the epoch's end)"
    assert "optim.epochs=1" in row["command"] and "max_steps" not in row["command"]
    assert math.isfinite(row["epoch_s"]) and row["epoch_s"] == pytest.approx(64 / row["samples_per_s"])
    assert row["s_per_step"] == pytest.approx(48 / row["samples_per_s"] / 3)  # 3 timed steps of 16


@pytest.mark.slow
def test_the_job_row_times_the_main_jobs_shape_end_to_end(tmp_path):
    """``bench job``: one epoch with the test split evaluated before and after it, the checkpoint saved and
    ``table3.md`` written; its parts add up to the whole, and the 4-epoch projection counts each part as the main job
    repeats it (5 evaluations, 4 saves)."""
    root, out = str(tmp_path / "bench"), tmp_path / "out"
    run_cli(["-m", "phi4_pron.bench", "job", "--tiny", "--only", "h100-r64", "--root", root, "--out", str(out)])
    result = json.loads((out / "job.json").read_text())
    (row,) = result["rows"]
    parts = ["load_s", "eval_first_s", "compile_steps_s", "steps_s", "save_s", "eval_s", "final_s"]
    assert row["table3"] and all(row[p] > 0 for p in parts)
    assert sum(row[p] for p in parts) <= row["total_s"] <= 1.05 * sum(row[p] for p in parts) + 1.0
    projected = (
        sum(row[p] for p in ["load_s", "eval_first_s", "compile_steps_s", "steps_s", "final_s"])
        + 3 * row["epoch_s"]
        + 4 * (row["save_s"] + row["eval_s"])
    )
    assert row["projected_4_epochs_s"] == pytest.approx(projected)
    assert result["summary"]["paper_table3_projection_s"] == pytest.approx(4 * projected)
    assert "eval.before_training=true" in row["command"] and "optim.epochs=1" in row["command"]
    adapter = row["checkpoint_gib"] - row["optimizer_state_gib"]
    assert row["checkpoint_gib"] > row["optimizer_state_gib"] > 0 and adapter > 0  # measured on the saved checkpoint
    assert row["run_4_epochs_gib"] == pytest.approx(4 * adapter + row["optimizer_state_gib"] + row["final_model_gib"])
