"""phi4_pron.run_folder: one job a folder, the checkpoint a job resumes from, and only with its own settings."""

from __future__ import annotations

import json

import pytest
from conftest import compose


def test_a_second_job_on_a_run_folder_fails_at_once(tmp_path):
    from phi4_pron.run_folder import RunFolderError, run_folder_lock

    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderError, match="in use by another job \\(pid"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):  # released
        pass


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    from phi4_pron.run_folder import CHECKPOINT_FILES, latest_checkpoint

    for epoch, files in [(1, CHECKPOINT_FILES), (2, CHECKPOINT_FILES[:1])]:  # epoch 2 lost its adapter
        d = tmp_path / f"checkpoint-epoch-{epoch}"
        d.mkdir()
        for f in files:
            (d / f).write_text(json.dumps({"global_step": epoch * 10}))
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
