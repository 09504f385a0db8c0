"""A run folder always matches its config, bad input is named before any model loads, settings Hydra lets through
are refused. The recordings and annotations for these are made here, not committed."""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest
from conftest import MINI, compose, run_cli


def _wav(path, seconds: float) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.random.default_rng(0).standard_normal(int(seconds * 16_000)) * 3000).astype("<i2").tobytes())


@pytest.fixture
def corpus(tmp_path):
    """A copy of the bundled corpus's train split to damage."""
    root = tmp_path / "corpus"
    shutil.copytree(MINI, root)
    return root


def _utts(root, n=8):
    return [line.split()[0] for line in (root / "train" / "wav.scp").read_text().splitlines()[:n]]


def _wav_of(root, utt):
    scp = dict(line.split(maxsplit=1) for line in (root / "train" / "wav.scp").read_text().splitlines())
    return root / scp[utt]


def test_bad_audio_and_annotations_are_all_listed_before_training(corpus):
    from phi4_pron.data import DataError, checked, load_split

    utts = _utts(corpus)
    scores_file = corpus / "resource" / "scores.json"
    scores = json.loads(scores_file.read_text())
    _wav(_wav_of(corpus, utts[0]), 28 / 16_000)  # 28 samples: below the feature extractor's 400
    _wav(_wav_of(corpus, utts[1]), 41.0)  # past the audio encoder's 40 s window
    scores[utts[2]]["accuracy"] = 99
    scores[utts[3]]["total"] = float("nan")
    scores[utts[4]]["words"][0]["mispronunciations"] = [{"canonical-phone": "X", "index": 9, "pronounced-phone": "Y"}]
    scores_file.write_text(json.dumps(scores))
    ds = load_split(str(corpus), "train")
    with pytest.raises(DataError) as e:
        checked(ds, min_seconds=0.025, max_seconds=40.0, skip=False)
    text = str(e.value)
    assert "5 problems in 5 of" in text
    for utt, what in [
        (utts[0], "below data.min_seconds"),
        (utts[1], "above data.max_seconds"),
        (utts[2], "accuracy=99.0 is not a score"),
        (utts[3], "total=nan"),
        (utts[4], "mispronunciation index 9 is outside"),
    ]:
        assert any(utt in line and what in line for line in text.splitlines()), (utt, what)
    kept, problems = checked(ds, min_seconds=0.025, max_seconds=40.0, skip=True)
    assert len(kept) == len(ds) - 5 and len(problems) == 5 and "seconds" in kept.column_names


def test_an_unreadable_score_names_its_utterance_and_field(corpus):
    from phi4_pron.data import DataError, load_split

    utts = _utts(corpus)
    scores_file = corpus / "resource" / "scores.json"
    scores = json.loads(scores_file.read_text())
    scores[utts[0]]["fluency"] = "ten"
    scores[utts[1]]["words"][0]["accuracy"] = "high"
    scores_file.write_text(json.dumps(scores))
    with pytest.raises(DataError) as e:
        load_split(str(corpus), "train")
    assert f"utterance {utts[0]}: fluency='ten' is not a number" in str(e.value)
    assert f"utterance {utts[1]}: word " in str(e.value) and "accuracy='high'" in str(e.value)


def test_settings_hydra_lets_through_are_refused():
    from phi4_pron.config import SettingError, TrainConfig, check_settings

    check_settings(compose(["experiment=smoke"]), TrainConfig)
    with pytest.raises(SettingError, match="lrr"):
        check_settings(compose(["+optim.lrr=1e-5"]), TrainConfig)
    with pytest.raises(SettingError, match=r"optim.lr=-0.001 must be above 0.*optim.epochs=0.0 must be above 0"):
        check_settings(compose(["optim.lr=-1e-3", "optim.epochs=0"]), TrainConfig)
    with pytest.raises(SettingError, match=r"hardware.audio_layers_kept=-1 must be 0 or above"):
        check_settings(compose(["hardware.audio_layers_kept=-1"]), TrainConfig)


def test_the_cli_refuses_an_added_key_before_loading(tmp_path):
    proc = run_cli(
        ["-m", "phi4_pron.train", "experiment=smoke", "+optim.lrr=1e-5", f"output_root={tmp_path}"],
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and "optim.lrr is not a setting" in proc.stderr
    assert "Loading weights" not in proc.stderr  # (Hydra has made the run folder by then, nothing more)


def test_a_missing_cpp_compiler_is_named_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")  # what Inductor looks for (torch._inductor.config.cpp.cxx)
    args = ["experiment=smoke", "hardware.compile=true", "hardware.compile_cpp_wrapper=true", f"output_root={tmp_path}"]
    proc = run_cli(["-m", "phi4_pron.train", *args], check=False, timeout=120)
    assert proc.returncode != 0 and "hardware.compile_cpp_wrapper=false" in proc.stderr
    assert "no-such-c++" in proc.stderr and "Loading weights" not in proc.stderr
    proc = run_cli(["-m", "phi4_pron.check", *args], check=False, timeout=300)
    assert proc.returncode == 1 and "[FAIL] C++ compiler" in proc.stdout and "[ ok ] generation" in proc.stdout


def test_a_second_job_on_a_run_folder_fails_at_once(tmp_path):
    from phi4_pron.training import RunFolderError, run_folder_lock

    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderError, match="in use by another job \\(pid"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):  # released
        pass


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    from phi4_pron.callbacks import CHECKPOINT_FILES, latest_checkpoint

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
    from phi4_pron.training import RunFolderError, resume_checkpoint

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


def test_an_empty_predictions_file_is_refused(tmp_path):
    from phi4_pron.predictions import read_predictions

    (tmp_path / "predictions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no predictions"):
        read_predictions(tmp_path / "predictions.jsonl")


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


def test_an_empty_model_folder_is_named_not_built_over(tmp_path):
    from omegaconf import OmegaConf

    from phi4_pron.modeling import ModelPathError, resolve_model_path

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("not a checkpoint")
    cfg = OmegaConf.create({"name_or_path": str(tmp_path / "model"), "build_tiny": True})
    with pytest.raises(ModelPathError, match="without a checkpoint \\(no config.json\\)"):
        resolve_model_path(cfg)


def test_an_unwritable_run_folder_is_named(tmp_path):
    from phi4_pron.training import RunFolderError, run_folder_lock

    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunFolderError, match="cannot write the run folder .*a_file/run"):
        with run_folder_lock(tmp_path / "a_file" / "run"):
            pass


def test_a_folder_another_process_landed_first_is_kept(tmp_path):
    """Two processes building one folder (torchrun ranks and the tiny checkpoint): the second to finish keeps the
    first one's folder, raises nothing and leaves no temporary folder behind."""
    from phi4_pron.results import atomic_folder

    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "mine").write_text("2")
        out.mkdir()
        (out / "theirs").write_text("1")  # the other process lands while this one is still writing
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
