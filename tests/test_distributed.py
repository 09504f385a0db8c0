"""Several processes (torchrun, gloo on the CPU) and the SLURM launcher."""

from __future__ import annotations

import json

import pytest
from conftest import compose, run_cli


@pytest.mark.slow
def test_two_process_ddp_writes_one_run_folder(tmp_path):
    """Two processes from a fresh cache: both build the tiny checkpoint (one folder lands whole), then train."""
    run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "phi4_pron.train",
            "experiment=smoke",
            f"output_root={tmp_path}",
            f"cache_dir={tmp_path / 'cache'}",
            "hardware.per_device_train_batch_size=2",
            "optim.epochs=2",
            "eval.limit=2",
            "eval.max_new_tokens=4",
        ]
    )
    run_dir = tmp_path / "paper_r64"
    tc = json.loads((run_dir / "training_config.json").read_text())
    assert (tc["world_size"], tc["effective_batch_size"]) == (2, 4)
    assert tc["training_arguments"]["gradient_accumulation_steps"] == 1
    state = json.loads((run_dir / "checkpoint-epoch-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 32  # 32 utterances x 2 questions / (2 per process x 2 processes) x 2 epochs
    assert {p.name for p in (run_dir / "checkpoint-epoch-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert len(list((run_dir / "logs").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["checkpoint-epoch-1", "checkpoint-epoch-2"]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-epoch-1", "checkpoint-epoch-2"]
    assert (run_dir / "final_model" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_slurm_launcher_composes():
    cfg = compose(["hydra/launcher=slurm", "lora=r320", "hardware=h100"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node) == (1, 1)
    cfg = compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher.partition == "gpu"
