"""``python -m phi4_pron.assess`` end to end on a smoke run's adapter."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MINI, run_cli


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


@pytest.mark.slow
def test_assess_one_recording_and_a_folder(run_dir, tmp_path):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    proc = run_cli(
        [
            "-m",
            "phi4_pron.assess",
            f"model_path={run_dir / 'final_model'}",
            f"audio={wav}",
            "text=WE CALL IT BEAR",
            "max_new_tokens=8",
        ]
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["audio"] == str(wav) and "assessment" in result and set(result["raw"]) == {"apa", "mdd"}

    folder = tmp_path / "recordings"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        shutil.copy(wav, folder / name)
    (tmp_path / "texts.tsv").write_text("a.wav\tWE CALL IT BEAR\nb.wav\tBOB LIVES IN CAIRO NOW\n")
    run_cli(
        [
            "-m",
            "phi4_pron.assess",
            f"model_path={run_dir / 'final_model'}",
            f"audio_dir={folder}",
            f"texts={tmp_path / 'texts.tsv'}",
            f"out={tmp_path / 'scores.jsonl'}",
            "max_new_tokens=8",
        ]
    )
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["audio=/nowhere/x.wav", "text=HELLO"], "audio file /nowhere/x.wav does not exist"),
        (["audio={wav}", "text= "], "empty text for"),
        (["audio={bad}", "text=HELLO"], "cannot read the audio"),
    ],
)
def test_assess_errors_are_clear(run_dir, tmp_path, args, message):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    args = [a.format(wav=wav, bad=bad) for a in args]
    proc = run_cli(["-m", "phi4_pron.assess", f"model_path={run_dir / 'final_model'}", *args], check=False)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.slow  # a subprocess
def test_assess_refuses_a_folder_without_adapter(tmp_path):
    wav = next((MINI / "WAVE").rglob("*.WAV"))
    proc = run_cli(["-m", "phi4_pron.assess", f"model_path={tmp_path}", f"audio={wav}", "text=HELLO"], check=False)
    assert proc.returncode != 0 and "has no adapter_config.json" in proc.stderr
