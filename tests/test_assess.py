"""``python -m phi4_pron.assess`` end to end on a smoke run's adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MINI, run_cli


@pytest.fixture(scope="module")
def run_dir(smoke_runs):
    return smoke_runs("r64")


def _assess_folder(run_dir, folder, tmp_path):
    """``assess`` on a folder, with ``tmp_path/texts.tsv``, into ``tmp_path/scores.jsonl``."""
    args = [f"audio_dir={folder}", f"texts={tmp_path / 'texts.tsv'}", f"out={tmp_path / 'scores.jsonl'}"]
    return run_cli(["-m", "phi4_pron.assess", f"model_path={run_dir / 'final_model'}", *args, "max_new_tokens=8"])


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
    _assess_folder(run_dir, folder, tmp_path)
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


@pytest.mark.slow
def test_a_folder_keeps_its_good_recordings_and_reports_the_bad(run_dir, tmp_path):
    """A 0-byte file and a 0.002 s one get one rule: reported as failed, the good recording assessed."""
    import wave

    wav = next((MINI / "WAVE").rglob("*.WAV"))
    folder = tmp_path / "recordings"
    folder.mkdir()
    shutil.copy(wav, folder / "good.wav")
    (folder / "empty.wav").write_bytes(b"")
    with wave.open(str(folder / "short.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes(b"\x00\x01" * 32)
    (tmp_path / "texts.tsv").write_text("".join(f"{n}.wav\tWE CALL IT BEAR\n" for n in ("empty", "good", "short")))
    proc = _assess_folder(run_dir, folder, tmp_path)
    results = {Path(r["audio"]).name: r for r in map(json.loads, (tmp_path / "scores.jsonl").read_text().splitlines())}
    assert set(results) == {"empty.wav", "good.wav", "short.wav"} and results["good.wav"]["error"] is None
    assert "empty.wav" in results["empty.wav"]["error"] and "below the 0.025 s" in results["short.wav"]["error"]
    assert "wrote 3 assessments (2 failed)" in proc.stderr
