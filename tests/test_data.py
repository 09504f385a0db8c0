"""phi4_pron.data: every corpus layout reads alike, and bad input gets a clear error naming the file or field and
what to do, before any model loads."""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest
from conftest import MINI, run_cli

from phi4_pron.data import DataError, decode_audio, load_split


@pytest.fixture
def corpus(tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(MINI, dst)
    return dst


def test_scores_json_at_the_root_is_accepted(corpus):
    (corpus / "resource" / "scores.json").rename(corpus / "scores.json")
    assert len(load_split(str(corpus), "test")) == 32


def test_missing_scores_json(corpus):
    (corpus / "resource" / "scores.json").unlink()
    with pytest.raises(DataError, match="no scores.json in .*corpus"):
        load_split(str(corpus), "train")


def test_missing_audio_file(corpus):
    wav = next((corpus / "WAVE").rglob("*.WAV"))
    wav.unlink()
    with pytest.raises(DataError, match=f"audio file .*{wav.name}.* does not exist"):
        load_split(str(corpus), "train" if wav.stem in (corpus / "train" / "wav.scp").read_text() else "test")


def test_unreadable_wav(corpus):
    from phi4_pron.data import with_lengths

    utt, rel = (corpus / "train" / "wav.scp").read_text().split("\n")[0].split()
    (corpus / rel).write_bytes(b"RIFF....not a wav at all")
    ds = load_split(str(corpus), "train")
    with pytest.raises(DataError, match=f"cannot read the audio of utterance {utt} .*{rel}"):
        with_lengths(ds)
    with pytest.raises(DataError, match=f"cannot decode the audio of utterance {utt} .*{rel}"):
        decode_audio(ds[0]["audio"], ds[0]["id"])


def test_utterance_without_scores(corpus):
    scores = json.loads((corpus / "resource" / "scores.json").read_text())
    utt = (corpus / "test" / "wav.scp").read_text().split()[0]
    del scores[utt]
    (corpus / "resource" / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(DataError, match=f"utterance {utt} .* has no entry"):
        load_split(str(corpus), "test")


def test_data_path_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="neither a corpus folder nor a Hugging Face dataset id"):
        load_split(str(tmp_path / "nowhere"), "train")


def test_save_to_disk_folder_loads(tmp_path):
    from datasets import DatasetDict

    ds = load_split(str(MINI), "test", limit=3)
    DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    again = load_split(str(tmp_path / "saved"), "test")
    assert again["id"] == ds["id"] and again[0]["words"] == ds[0]["words"]


def test_lengths_are_durations():
    from phi4_pron.data import with_lengths

    ds = with_lengths(load_split(str(MINI), "train", limit=2))
    assert ds[0]["length"] == 328 and all(n > 100 for n in ds["length"])  # 000010149.WAV lasts 3.28 s


def test_pcm_wavs_read_directly_as_torchcodec_decodes_them(tmp_path):
    """16 kHz mono 16-bit WAVs (the corpus's) skip FFmpeg with the same samples, bit for bit; any other WAV, or one
    with another layout still goes to torchcodec (resampled, mixed down); one cut short is refused, named."""
    import wave

    import numpy as np

    from phi4_pron.data import _decoder, _wav_samples

    wavs = sorted((MINI / "WAVE").rglob("*.WAV"))[:8]
    for wav in wavs:
        codec = _decoder(str(wav)).get_all_samples().data[0].numpy()
        for cell in (str(wav), {"bytes": wav.read_bytes(), "path": None}):
            direct = _wav_samples(cell)
            assert direct.dtype == np.float32 and np.array_equal(direct, codec)
    samples = (np.sin(np.arange(8000) / 5) * 20000).astype("<i2")
    for name, rate, channels in (("44k.wav", 44_100, 1), ("stereo.wav", 16_000, 2)):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
            w.writeframes(np.repeat(samples, channels).tobytes())
        assert _wav_samples(str(tmp_path / name)) is None
        assert abs(len(decode_audio(str(tmp_path / name))) - 8000 * 16_000 / rate) <= 2  # torchcodec: 16 kHz mono
    cut = wavs[0].read_bytes()[:-100]  # the header names more frames than the file holds
    (tmp_path / "cut.wav").write_bytes(cut)
    with pytest.raises(DataError, match="cut.wav is cut short: its header promises"):
        _wav_samples(str(tmp_path / "cut.wav"))
    assert _wav_samples(str(tmp_path / "missing.wav")) is None and _wav_samples(str(tmp_path / "x.flac")) is None


def test_wav_headers_give_ffmpegs_durations(tmp_path):
    """The RIFF header fast path agrees with FFmpeg's probe; a header whose size it cannot trust goes to FFmpeg."""
    from phi4_pron.data import _decoder, _wav_seconds, check_audio_file

    wavs = sorted((MINI / "WAVE").rglob("*.WAV"))[:8]
    for wav in wavs:
        probe = _decoder(str(wav)).metadata.duration_seconds_from_header
        assert _wav_seconds(str(wav)) == pytest.approx(probe, abs=1e-3)
        assert _wav_seconds({"bytes": wav.read_bytes(), "path": None}) == pytest.approx(probe, abs=1e-3)
    streamed = bytearray(wavs[0].read_bytes())
    streamed[40:44] = b"\xff\xff\xff\xff"  # the data chunk's size, as a stream writer leaves it
    (tmp_path / "streamed.wav").write_bytes(streamed)
    assert _wav_seconds(str(tmp_path / "streamed.wav")) is None
    assert check_audio_file(str(tmp_path / "streamed.wav")) == pytest.approx(check_audio_file(str(wavs[0])), abs=0.05)
    assert _wav_seconds(str(tmp_path / "x.flac")) is None


SCORES = ("accuracy", "completeness", "fluency", "prosodic", "total")


def _words(row: dict) -> list[tuple]:
    return [(w["text"], float(w["accuracy"]), w["phones"], w["mispronunciations"]) for w in row["words"]]


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_hub_dataset_as_downloaded_reads_as_the_release_does(hub_snapshot, split):
    """``data.path`` = what ``hf download mispeech/speechocean762 --repo-type dataset`` leaves (parquet files named by
    its README, the audio embedded, no id column): the same utterances as the corpus release, under the corpus's ids
    (from the audio's file names), with the same scores, words and audio samples."""
    import numpy as np

    from phi4_pron.data import with_lengths

    hub, release = load_split(str(hub_snapshot), split), load_split(str(MINI), split)
    assert hub["id"] == release["id"] and len(hub) == 32
    for h, r in zip(hub, release, strict=True):
        assert h["text"] == r["text"] and {k: float(h[k]) for k in SCORES} == {k: r[k] for k in SCORES}
        assert _words(h) == _words(r)
        assert "bytes" in h["audio"] and h["audio"]["path"] == f"{h['id']}.wav"  # embedded, as published
        np.testing.assert_array_equal(decode_audio(h["audio"], h["id"]), decode_audio(r["audio"], r["id"]))
    assert with_lengths(hub)["length"] == with_lengths(release)["length"]


def test_hub_out_of_reach_names_the_download(tmp_path):
    """Offline (here: HF_HUB_OFFLINE), the default hub dataset and checkpoint each stop with the command that
    downloads them, before any weights load."""
    offline = {"HF_HUB_OFFLINE": "1"}
    load = "from phi4_pron.data import load_split; load_split('mispeech/speechocean762', 'test')"
    data = run_cli(["-c", load], check=False, env=offline, timeout=300)
    assert data.returncode != 0
    assert "DataError" in data.stderr and "hf download mispeech/speechocean762 --repo-type dataset" in data.stderr
    train = ["-m", "phi4_pron.train", "data=mini", "hardware=cpu", "logger=none", f"hydra.run.dir={tmp_path}"]
    model = run_cli(train, check=False, env=offline, timeout=300)
    assert model.returncode != 0 and "ModelPathError" in model.stderr
    assert "hf download microsoft/Phi-4-multimodal-instruct --revision refs/pr/70" in model.stderr
    assert "Loading weights" not in model.stderr


def _wav(path, seconds: float) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.random.default_rng(0).standard_normal(int(seconds * 16_000)) * 3000).astype("<i2").tobytes())


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


def test_a_truncated_wav_is_named_in_either_split(corpus):
    """A copy cut short (header 3.28 s, file 0.62 s) is a problem before training, and a failed recording in
    evaluation: never decoded as the part that is there."""
    from phi4_pron.data import checked

    for split in ("train", "test"):
        utt, rel = (corpus / split / "wav.scp").read_text().splitlines()[0].split()
        wav = corpus / rel
        wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 5])
        ds = load_split(str(corpus), split, limit=3)
        with pytest.raises(DataError, match=f"utterance {utt}.*is cut short: its header promises"):
            checked(ds, min_seconds=0.025, max_seconds=40.0, skip=False)
        with pytest.raises(DataError, match=f"cannot decode the audio of utterance {utt}.*cut short"):
            decode_audio(ds[0]["audio"], utt)


def _spoil_test_split(corpus):
    """The evaluation split's annotations as the issue found them accepted: out of range, NaN, a bad index, a word
    without phones, a missing recording."""
    test = [line.split() for line in (corpus / "test" / "wav.scp").read_text().splitlines()]
    scores_file = corpus / "resource" / "scores.json"
    scores = json.loads(scores_file.read_text())
    scores[test[0][0]]["fluency"] = 99
    scores[test[1][0]]["total"] = float("nan")
    bad_index = {"canonical-phone": "X", "index": 9, "pronounced-phone": "Y"}
    scores[test[2][0]]["words"][0]["mispronunciations"] = [bad_index]
    scores[test[3][0]]["words"][0]["phones"] = []
    scores_file.write_text(json.dumps(scores))
    (corpus / test[4][1]).unlink()
    return [u for u, _ in test[:5]]


def test_the_evaluation_split_is_checked_like_the_training_split(corpus):
    from types import SimpleNamespace

    from phi4_pron.data import load_checked

    utts = _spoil_test_split(corpus)
    data = SimpleNamespace(path=str(corpus), revision=None, on_bad="error", min_seconds=0.025, max_seconds=40.0)
    with pytest.raises(DataError, match=f"utterance {utts[4]}: audio file .* does not exist"):
        load_checked(data, "test", audio=False)
    (corpus / "test" / "wav.scp").write_text("\n".join((corpus / "test" / "wav.scp").read_text().splitlines()[:4]))
    with pytest.raises(DataError) as e:
        load_checked(data, "test", audio=False)
    whats = ["fluency=99.0 is not a score", "total=nan", "index 9 is outside", "has no phones"]
    for utt, what in zip(utts[:4], whats, strict=True):
        assert any(utt in line and what in line for line in str(e.value).splitlines()), (utt, what)
    data.on_bad = "skip"
    kept, problems = load_checked(data, "test", audio=False)
    assert len(kept) == 0 and len(problems) == 4


def test_on_bad_skip_leaves_out_a_missing_recording_and_an_unreadable_score(corpus):
    from types import SimpleNamespace

    from phi4_pron.data import load_checked

    utts = _utts(corpus, 3)
    _wav_of(corpus, utts[0]).unlink()
    scores_file = corpus / "resource" / "scores.json"
    scores = json.loads(scores_file.read_text())
    scores[utts[1]]["fluency"] = "ten"
    scores_file.write_text(json.dumps(scores))
    data = SimpleNamespace(path=str(corpus), revision=None, on_bad="skip", min_seconds=0.025, max_seconds=40.0)
    kept, problems = load_checked(data, "train")
    assert len(kept) == 32 - 2 and set(kept["id"]).isdisjoint(utts[:2]) and utts[2] in kept["id"]
    assert len(problems) == 2 and "does not exist" in problems[0] + problems[1] and "'ten'" in problems[0] + problems[1]


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("entrypoint", ["train", "evaluate"])
def test_a_spoilt_evaluation_split_stops_before_the_model_loads(corpus, smoke_runs, entrypoint):
    utts = _spoil_test_split(corpus)
    args = {
        "train": [
            "experiment=smoke",
            "logger=none",
            "optim.epochs=1",
            "data.max_train_samples=4",
            "eval.limit=6",
            f"output_root={corpus.parent / 'out'}",
        ],
        "evaluate": [f"run_dir={smoke_runs('r64')}", "eval.limit=6", f"out_dir={corpus.parent / 'ev'}"],
    }[entrypoint]
    proc = run_cli(["-m", f"phi4_pron.{entrypoint}", *args, f"data.path={corpus}"], check=False, timeout=300)
    assert proc.returncode != 0 and f"utterance {utts[4]}: audio file" in proc.stderr
    assert "Loading weights" not in proc.stderr
    proc = run_cli(
        ["-m", f"phi4_pron.{entrypoint}", *args, f"data.path={corpus}", "data.eval_split=nosuch"], check=False
    )
    assert proc.returncode != 0 and "nosuch" in proc.stderr and "Loading weights" not in proc.stderr
