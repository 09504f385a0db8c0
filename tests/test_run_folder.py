"""phi4_pron.run_folder: one job a folder, the checkpoint a job resumes from, and only with its own settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, run_cli


def test_a_second_job_on_a_run_folder_fails_at_once(tmp_path):
    from phi4_pron.run_folder import RunFolderError, run_folder_lock

    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderError, match="in use by another job \\(pid"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):  # released
        pass


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from phi4_pron.run_folder import CHECKPOINT_FILES, latest_checkpoint

    for epoch, files in [(1, CHECKPOINT_FILES), (2, CHECKPOINT_FILES[:1])]:  # epoch 2 lost its adapter
        d = tmp_path / f"checkpoint-epoch-{epoch}"
        d.mkdir()
        for f in files:
            (d / f).write_text(json.dumps({"global_step": epoch * 10}))
        if "adapter_model.safetensors" in files:  # a real one: its header is checked
            save_file({"w": torch.zeros(2)}, d / "adapter_model.safetensors")
    (tmp_path / "checkpoint-30").mkdir()  # a save killed before it became checkpoint-epoch-3
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch-1"


@pytest.mark.slow
def test_a_run_folder_resumes_only_with_its_own_settings(smoke_runs):
    from phi4_pron.run_folder import RunFolderError, resume_checkpoint

    run_dir = smoke_runs("r64")
    same = compose(["experiment=smoke", "lora=r64", f"output_root={run_dir.parent}"])
    assert resume_checkpoint(same, run_dir).endswith("checkpoint-epoch-3")
    other = compose(["experiment=smoke", "lora=r64", f"output_root={run_dir.parent}", "optim.lr=5e-4"])
    with pytest.raises(RunFolderError, match=r"optim.lr: 0.005 -> 0.0005.*resume=force"):
        resume_checkpoint(other, run_dir)
    forced = compose(["experiment=smoke", "lora=r64", f"output_root={run_dir.parent}", "optim.lr=5e-4", "resume=force"])
    assert resume_checkpoint(forced, run_dir).endswith("checkpoint-epoch-3")
    for harmless in ("eval.limit=2", "hardware.compile_cpp_wrapper=true", "hardware.audio_layers_kept=4"):
        cfg = compose(["experiment=smoke", "lora=r64", f"output_root={run_dir.parent}", harmless])
        assert resume_checkpoint(cfg, run_dir) is not None, harmless


def test_an_unwritable_run_folder_is_named(tmp_path):
    from phi4_pron.run_folder import RunFolderError, run_folder_lock

    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="cannot write the run folder .*a_file/run"):
        with run_folder_lock(tmp_path / "a_file" / "run"):
            pass


def _fake_run(run_dir, overrides, run_id="run-a", epochs=(1, 2, 3), finished=True):
    """A run folder as a finished job leaves it: record, whole (tiny) checkpoints stamped with ``run_id``, evaluations,
    final_model/."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    cfg = compose(overrides)
    config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "training_config.json").write_text(json.dumps({"run_id": run_id, "config": config}))
    for epoch in epochs:
        d = run_dir / f"checkpoint-epoch-{epoch}"
        d.mkdir()
        save_file({"w": torch.full((4, 4), float(epoch))}, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text("{}")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": 10 * epoch}))
        (d / "run_id").write_text(run_id + "\n")
        (run_dir / "eval" / d.name).mkdir(parents=True)
        (run_dir / "eval" / d.name / "metrics.json").write_text("{}")
    if finished:
        (run_dir / "final_model").mkdir()
    return cfg


def test_starting_over_moves_the_old_run_aside(tmp_path):
    """resume=false into a used folder: no file of the old run is left where this run's would be read."""
    from phi4_pron.run_folder import resume_checkpoint

    run_dir = tmp_path / "paper_r64"
    _fake_run(run_dir, ["experiment=smoke", f"output_root={tmp_path}"])
    (run_dir / "table3.md").write_text("old")
    again = compose(["experiment=smoke", f"output_root={tmp_path}", "optim.lr=1e-3", "optim.epochs=1", "resume=false"])
    assert resume_checkpoint(again, run_dir) is None
    (aside,) = run_dir.glob("previous-*")
    assert sorted(p.name for p in run_dir.iterdir()) == [aside.name]
    assert {"checkpoint-epoch-3", "eval", "final_model", "training_config.json", "table3.md"} <= {
        p.name for p in aside.iterdir()
    }


def test_a_finished_run_without_checkpoints_is_still_its_folders_run(tmp_path):
    """Its checkpoints deleted, a finished run's record, final_model/ and eval/ still say whose the folder is."""
    from phi4_pron.run_folder import RunFolderError, resume_checkpoint

    run_dir = tmp_path / "paper_r64"
    _fake_run(run_dir, ["experiment=smoke", f"output_root={tmp_path}"], epochs=())
    other = compose(["experiment=smoke", f"output_root={tmp_path}", "optim.lr=1e-3"])
    with pytest.raises(RunFolderError, match=r"optim.lr: 0.005 -> 0.001.*resume=false: the old run's files are moved"):
        resume_checkpoint(other, run_dir)
    assert (run_dir / "final_model").is_dir()  # refused: untouched
    same = compose(["experiment=smoke", f"output_root={tmp_path}"])
    assert resume_checkpoint(same, run_dir) is None  # nothing to resume: starts over, the old files aside
    assert [p.name for p in run_dir.iterdir()][0].startswith("previous-") and len(list(run_dir.iterdir())) == 1


def test_a_checkpoint_another_run_wrote_is_never_resumed(tmp_path):
    from phi4_pron.run_folder import latest_checkpoint, resume_checkpoint

    run_dir = tmp_path / "paper_r64"
    cfg = _fake_run(run_dir, ["experiment=smoke", f"output_root={tmp_path}"], epochs=(1, 2))
    (run_dir / "checkpoint-epoch-2" / "run_id").write_text("run-b\n")  # copied in from another run
    assert resume_checkpoint(cfg, run_dir).endswith("checkpoint-epoch-1")
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-epoch-2"  # by step alone, without the run's id


def test_a_cut_short_checkpoint_is_skipped_naming_its_file(tmp_path, caplog):
    from phi4_pron.run_folder import latest_checkpoint

    _fake_run(tmp_path, ["experiment=smoke"], epochs=(1, 2))
    adapter = tmp_path / "checkpoint-epoch-2" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-20])  # a kill or a full disk half way through the save
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch-1"
    assert "checkpoint-epoch-2 is not resumable (adapter_model.safetensors: cut short" in caplog.text
    adapter.write_bytes(b"\x10")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch-1"


@pytest.mark.slow  # a subprocess
def test_a_refused_job_leaves_the_folder_alone(tmp_path):
    run_dir = tmp_path / "paper_r64"
    _fake_run(run_dir, ["experiment=smoke", f"output_root={tmp_path}"])
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the running job's\n")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    proc = run_cli(
        ["-m", "phi4_pron.train", "experiment=smoke", f"output_root={tmp_path}", "optim.lr=1e-3", "logger=none"],
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0 and "optim.lr: 0.005 -> 0.001" in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the running job's\n"
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}  # the lock: whose turn
    assert after == before


def test_older_checkpoints_give_up_their_optimizer_state(tmp_path):
    """keep_optimizer_states bounds a run's disk; a pruned checkpoint is never resumed (it would restart Adam)."""
    from phi4_pron.run_folder import latest_checkpoint, prune_optimizer_states

    _fake_run(tmp_path, ["experiment=smoke"], epochs=(1, 2, 3))
    for epoch in (1, 2, 3):
        (tmp_path / f"checkpoint-epoch-{epoch}" / "optimizer.pt").write_bytes(b"x" * 100)
    assert prune_optimizer_states(tmp_path, keep=-1) == []
    assert prune_optimizer_states(tmp_path, keep=2) == [tmp_path / "checkpoint-epoch-1"]
    assert [(tmp_path / f"checkpoint-epoch-{e}" / "optimizer.pt").exists() for e in (1, 2, 3)] == [False, True, True]
    adapter = tmp_path / "checkpoint-epoch-3" / "adapter_model.safetensors"
    adapter.write_bytes(b"")  # the newest cut short: the previous whole one is resumed, never a pruned one
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-epoch-2"
    prune_optimizer_states(tmp_path, keep=1)
    assert latest_checkpoint(tmp_path) is None
