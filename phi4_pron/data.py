"""speechocean762 splits as ``datasets.Dataset``s with one schema, whatever the source.

Sources (``data.path``):
- a local copy of the corpus release (Kaldi layout: ``WAVE/``, ``train/``, ``test/``, ``scores.json`` at
  the root or under ``resource/``), e.g. the bundled ``data/speechocean762-mini``;
- a folder written by ``Dataset(Dict).save_to_disk``;
- a local copy of the hub dataset (``hf download mispeech/speechocean762 --repo-type dataset --local-dir DIR``:
  ``README.md`` naming its parquet files under ``data/``, the audio embedded in them), read as the hub id is;
- otherwise a Hugging Face Hub dataset id (``mispeech/speechocean762``).

Every split has the columns ``id``, ``audio`` (``datasets.Audio(decode=False)``: a path or bytes, decoded by
:func:`decode_audio`: torchcodec, resampled to 16 kHz mono, or a 16 kHz mono PCM WAV read directly; a bad file is
named with its utterance),
``text``, ``accuracy``, ``completeness``, ``fluency``, ``prosodic``, ``total`` and ``words`` (the corpus's
word annotations, ``phones`` as a list).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Audio, Dataset, DatasetDict, load_dataset, load_from_disk

SAMPLING_RATE = 16_000  # Phi-4-multimodal's feature extractor expects 16 kHz
COLUMNS = ["id", "audio", "text", "accuracy", "completeness", "fluency", "prosodic", "total", "words"]


class DataError(ValueError):
    """Bad or missing corpus input; the message names the file and what to do."""


def load_split(
    path: str, split: str, revision: str | None = None, limit: int | None = None, problems: list[str] | None = None
) -> Dataset:
    """Load one split (``train`` or ``test``) from any supported source, ``limit`` rows at most. Utterances of a
    corpus release that cannot be read (a missing file, a score that is not a number) stop the load, all named; or,
    given a ``problems`` list, are left out and named in it."""
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            ds = _from_disk(local, split)
        elif any(local.glob("data/*.parquet")):  # the hub dataset, downloaded
            ds = _from_hub(str(local), split, None)
        else:
            ds = _from_kaldi(local, split, problems)
    elif local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise DataError(
            f"data.path={path!r} is neither a corpus folder nor a Hugging Face dataset id. Point it at the "
            "speechocean762 release (the folder holding WAVE/, train/, test/), a save_to_disk folder, "
            "or use the hub id mispeech/speechocean762."
        )
    else:
        ds = _from_hub(path, split, revision)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.cast_column("audio", Audio(decode=False))


def _normalise(ds: Dataset) -> Dataset:
    if "id" not in ds.column_names:
        ds = ds.add_column("id", _utterance_ids(ds))
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"the dataset lacks the columns {missing}; speechocean762's schema has {COLUMNS}.")
    return ds.select_columns(COLUMNS)


def _utterance_ids(ds: Dataset) -> list[str]:
    """The corpus's utterance ids, from the audio's file names (the hub's ``000030012.wav``: no id column), so that
    predictions name utterances as the corpus release does; row numbers if the names are missing or repeat."""
    import pyarrow.compute as pc

    names = []
    audio = ds.select_columns(["audio"]).with_format("arrow")[:]["audio"] if "audio" in ds.column_names else None
    if audio is not None and audio.type.num_fields:  # a struct of bytes and path: only the paths are read
        names = [Path(p or "").stem for p in pc.struct_field(audio, "path").to_pylist()]
    if all(names) and len(set(names)) == len(ds) > 0:
        return names
    return [f"{i:05d}" for i in range(len(ds))]


def _from_hub(name: str, split: str, revision: str | None) -> Dataset:
    try:
        ds = load_dataset(name, split=split, revision=revision)
    except ConnectionError as e:  # offline, or HF_HUB_OFFLINE set
        raise DataError(
            f"data.path={name!r} cannot be read: {e}. Without a connection to the Hugging Face Hub, download the "
            f"dataset where there is one,\n    hf download {name} --repo-type dataset --local-dir speechocean762\n"
            "and set data.path=speechocean762 (the folder), or point data.path at the corpus release."
        ) from e
    return _normalise(ds)


def _from_disk(folder: Path, split: str) -> Dataset:
    ds = load_from_disk(str(folder))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{folder} has the splits {list(ds)}, not {split!r}.")
        ds = ds[split]
    return _normalise(ds)


def find_scores_json(root: Path) -> Path:
    for candidate in (root / "scores.json", root / "resource" / "scores.json"):
        if candidate.exists():
            return candidate
    raise DataError(
        f"no scores.json in {root} or {root / 'resource'}: the speechocean762 release keeps its annotations "
        "there. Point data.path at the release's top folder."
    )


def _read_table(file: Path) -> dict[str, str]:
    """A Kaldi two-column file (``key value...``) as a dict."""
    if not file.exists():
        raise DataError(
            f"{file} is missing: a Kaldi data folder needs wav.scp and text. Is data.path the release's top folder?"
        )
    rows = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            key, *value = line.split(maxsplit=1)
            if not value:
                raise DataError(f"{file}:{n}: expected '<utterance id> <value>', got {line!r}.")
            rows[key] = value[0].strip()
    return rows


def _number(value: Any, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r} is not a number") from None


def _from_kaldi(root: Path, split: str, skipped: list[str] | None = None) -> Dataset:
    scores_file = find_scores_json(root)
    try:
        scores: dict[str, Any] = json.loads(scores_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{scores_file} is not valid JSON ({e}).") from e
    wav_scp = _read_table(root / split / "wav.scp")
    texts = _read_table(root / split / "text")
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    problems = []
    for utt, rel in wav_scp.items():
        wav = root / rel
        if not wav.exists():
            problems.append(
                f"utterance {utt}: audio file {wav} does not exist (restore it or remove the utterance "
                f"from {root / split / 'wav.scp'})"
            )
            continue
        if utt not in scores:
            problems.append(f"utterance {utt} of {root / split / 'wav.scp'} has no entry in {scores_file}")
            continue
        s = scores[utt]
        try:
            row = {
                "id": utt,
                "audio": str(wav),
                "text": s.get("text") or texts[utt],
                **{k: _number(s[k], k) for k in ("accuracy", "completeness", "fluency", "prosodic", "total")},
                "words": [_word(w) for w in s["words"]],
            }
        except KeyError as e:
            problems.append(f"utterance {utt}: the field {e} is missing")
            continue
        except (TypeError, ValueError) as e:
            problems.append(f"utterance {utt}: {e}")
            continue
        for c in COLUMNS:
            rows[c].append(row[c])
    if problems and skipped is not None:
        skipped += problems
    elif problems:
        raise DataError(
            f"{len(problems)} utterances of {root} ({split}) cannot be read; each needs an audio file, text, accuracy, "
            "completeness, fluency, prosodic, total and words:\n  "
            + "\n  ".join(problems[:50])
            + ("\n  ..." if len(problems) > 50 else "")
        )
    return Dataset.from_dict(rows)


def _word(w: dict[str, Any]) -> dict[str, Any]:
    phones = w["phones"].split() if isinstance(w["phones"], str) else list(w["phones"])
    name = f"word {w.get('text')!r}"
    return {
        "text": w["text"],
        "accuracy": _number(w["accuracy"], f"{name} accuracy"),
        "stress": _number(w["stress"], f"{name} stress"),
        "total": _number(w["total"], f"{name} total"),
        "phones": phones,
        "phones-accuracy": [_number(x, f"{name} phones-accuracy") for x in w.get("phones-accuracy", [])],
        "mispronunciations": [
            {
                "canonical-phone": m["canonical-phone"],
                "index": int(_number(m["index"], f"{name} mispronunciation index")),
                "pronounced-phone": m["pronounced-phone"],
            }
            for m in w.get("mispronunciations") or []
        ],
    }


def _decoder(audio: Any):
    from torchcodec.decoders import AudioDecoder

    source = audio if isinstance(audio, (str, Path)) else audio.get("bytes") or audio["path"]
    return AudioDecoder(source, sample_rate=SAMPLING_RATE, num_channels=1)


def _audio_name(audio: Any) -> str:
    return str(audio) if isinstance(audio, (str, Path)) else str(audio.get("path") or "embedded audio")


def decode_audio(audio: Any, utt_id: str = "?"):
    """An ``audio`` cell (path, or ``{"bytes", "path"}``) as a 1-D float32 numpy array at 16 kHz mono.

    A numpy array (or a list of floats, as ``datasets`` returns one) is taken as decoded 16 kHz mono samples; a
    16 kHz mono 16-bit PCM WAV is read directly (:func:`_wav_samples`), anything else by torchcodec.
    """
    if isinstance(audio, (np.ndarray, list)):
        return np.asarray(audio, dtype=np.float32)
    try:
        samples = _wav_samples(audio)
    except TruncatedWav as e:
        raise DataError(f"cannot decode the audio of utterance {utt_id}: {e}") from None
    if samples is not None:
        return samples
    try:
        return _decoder(audio).get_all_samples().data[0].numpy()
    except Exception as e:  # torchcodec raises RuntimeError/ValueError with FFmpeg's words
        raise DataError(
            f"cannot decode the audio of utterance {utt_id} ({_audio_name(audio)}): {e}. Check the file is a "
            "readable WAV/FLAC/MP3 and FFmpeg is installed (apt-get install ffmpeg)."
        ) from e


def _wav_source(audio: Any) -> tuple[Any, int | None] | None:
    """(file name or bytes stream, size or None) of a cell that may be a WAV; None for anything else."""
    import io

    data, path = (None, str(audio)) if isinstance(audio, (str, Path)) else (audio.get("bytes"), audio.get("path"))
    if data:  # embedded bytes come first, as for decoding
        return (io.BytesIO(data), len(data)) if data[:4] == b"RIFF" else None
    if path and str(path).lower().endswith(".wav"):
        return str(path), None
    return None


STREAMED = 0xFFFF0000  # a data size at least this large (or 0) is a streamed WAV's "unknown": FFmpeg reads to the end


class TruncatedWav(DataError):
    """A WAV holds fewer bytes than its header promises (a copy cut short): neither split uses it silently."""


def _wav_header(audio: Any) -> tuple[Any, int, int, int, int] | None:
    """(wave reader, frames, sample rate, channels, sample width) of a PCM WAV whose header gives a size, or None for
    anything else (left to FFmpeg). Raises :class:`TruncatedWav` where the file is shorter than its header says."""
    import wave

    if (found := _wav_source(audio)) is None:
        return None
    source, size = found
    try:
        size = size if size is not None else Path(source).stat().st_size
        w = wave.open(source)
    except (wave.Error, EOFError, OSError):
        return None  # not plain PCM, or broken: FFmpeg reads it, or names the problem
    frames, rate, channels, width = w.getnframes(), w.getframerate(), w.getnchannels(), w.getsampwidth()
    promised = frames * channels * width
    if not 0 < promised < STREAMED or not rate:
        w.close()
        return None
    if promised > size:
        w.close()
        raise TruncatedWav(
            f"{_audio_name(audio)} is cut short: its header promises {frames / rate:.2f} s ({promised} bytes of "
            f"samples), the file holds {size} bytes in all. Restore the file, or remove the utterance."
        )
    return w, frames, rate, channels, width


def _wav_seconds(audio: Any) -> float | None:
    """A PCM WAV's duration from its RIFF header (Python's ``wave``, microseconds, where FFmpeg's probe takes
    milliseconds: a split's thousands of headers are read before training and evaluation); None for anything else."""
    if (header := _wav_header(audio)) is None:
        return None
    w, frames, rate, *_ = header
    w.close()
    return frames / rate


def _wav_samples(audio: Any) -> np.ndarray | None:
    """A 16 kHz mono 16-bit PCM WAV's samples (speechocean762's format) read by Python's ``wave``: the float32 values
    torchcodec decodes, bit for bit, in a small fraction of its time. None for anything else (torchcodec decodes it:
    resampling, mixing down)."""
    import wave

    if (header := _wav_header(audio)) is None:
        return None
    w, frames, *layout = header
    try:
        with w:
            if tuple(layout) != (SAMPLING_RATE, 1, 2):
                return None
            data = w.readframes(frames)
    except (wave.Error, EOFError, OSError):
        return None
    if len(data) != 2 * frames:  # a header that does not match its data chunk: left to FFmpeg
        return None
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def check_audio_file(audio: Any, utt_id: str = "?") -> float:
    """Open one recording's header (cheap); returns its duration in seconds.

    A missing or broken file raises :class:`DataError` naming it.
    """
    if isinstance(audio, (np.ndarray, list)):
        return len(audio) / SAMPLING_RATE
    try:
        seconds = _wav_seconds(audio)
    except TruncatedWav as e:
        raise DataError(f"cannot read the audio of utterance {utt_id}: {e}") from None
    if seconds is not None:
        return seconds
    try:
        meta = _decoder(audio).metadata
        return float(meta.duration_seconds_from_header or meta.duration_seconds or 0.0)
    except Exception as e:
        raise DataError(
            f"cannot read the audio of utterance {utt_id} ({_audio_name(audio)}): {e}. Replace the file or "
            "remove the utterance from the corpus."
        ) from e


SCORE_RANGE = (0.0, 10.0)  # the raters' utterance scores


def annotation_problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one utterance's annotation: scores that are not finite or outside 0-10, a word without
    phones, a mispronunciation index outside its word's phones."""
    import math

    problems = []
    for key in ("accuracy", "fluency", "prosodic", "total"):
        value = row[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and SCORE_RANGE[0] <= value <= SCORE_RANGE[1]):
            problems.append(f"{key}={value} is not a score in 0-10")
    for n, word in enumerate(row["words"]):
        if not word["phones"]:
            problems.append(f"word {n} {word['text']!r} has no phones")
        for m in word.get("mispronunciations") or []:
            if not 0 <= m["index"] < len(word["phones"]):
                problems.append(
                    f"word {n} {word['text']!r}: mispronunciation index {m['index']} is outside its "
                    f"{len(word['phones'])} phones {word['phones']}"
                )
    return problems


def checked(
    ds: Dataset, min_seconds: float, max_seconds: float, skip: bool, audio_fatal: bool = True
) -> tuple[Dataset, list[str]]:
    """Every utterance's audio (readable, ``min_seconds``-``max_seconds`` long) and annotation checked before any
    model loads; adds the ``seconds`` column. Problems stop the run, all of them listed, each naming the utterance,
    file and field; with ``skip`` the bad utterances are left out instead. Without ``audio_fatal`` a recording's
    problem is listed but the recording kept (its decoding fails later, counted). Returns (dataset, problems)."""
    problems, keep, seconds, audio_problems = [], [], [], []
    rows = ds.remove_columns("audio").to_list()
    for i, (row, audio) in enumerate(zip(rows, ds["audio"], strict=True)):
        where = f"utterance {row['id']} ({_audio_name(audio)})"
        annotation = annotation_problems(row)
        found = [f"{where}: {p}" for p in annotation]
        try:
            duration = check_audio_file(audio, row["id"])
        except DataError as e:
            found.append(str(e))
            duration = 0.0
        else:
            if duration < min_seconds:
                found.append(
                    f"{where}: {duration:.3f} s of audio, below data.min_seconds={min_seconds} (the feature "
                    "extractor needs 400 samples)"
                )
            elif duration > max_seconds:
                found.append(
                    f"{where}: {duration:.1f} s of audio, above data.max_seconds={max_seconds}: split the "
                    "recording, or raise data.max_seconds (the audio encoder attends within 40 s)"
                )
        if not audio_fatal and found and not annotation:
            audio_problems += found
            found = []
        problems += found
        if not found:
            keep.append(i)
            seconds.append(duration)
    if problems and not skip:
        raise DataError(
            f"{len(problems)} problems in {len(ds) - len(keep)} of {len(ds)} utterances (data.on_bad=skip leaves "
            "them out, counted):\n  " + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else "")
        )
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds.add_column("seconds", seconds), problems + audio_problems


def load_checked(data: Any, split: str, limit: int | None = None, audio: bool = True) -> tuple[Dataset, list[str]]:
    """One split of ``data`` (the ``data`` settings) with every utterance checked before any model loads
    (:func:`checked`); ``data.on_bad=skip`` leaves the bad ones out, returned as problems. Without ``audio`` the
    recordings' problems are returned but the recordings kept (evaluation counts each as a failed utterance)."""
    skip = getattr(data.on_bad, "value", data.on_bad) == "skip"
    problems: list[str] = []
    ds = load_split(data.path, split, data.revision, limit, problems if skip else None)
    ds, found = checked(ds, data.min_seconds, data.max_seconds, skip, audio_fatal=audio)
    return ds, problems + found


def with_lengths(
    ds: Dataset, num_tokens: Callable[[dict, float], int] | None = None, unreadable_seconds: float | None = None
) -> Dataset:
    """Check every recording of a split (a broken file stops the run before any model loads) and add its duration
    (``seconds``) and a ``length`` column for length-grouped batching: ``num_tokens(row, seconds)`` (the model's
    sequence length, ``PronunciationCollator.num_tokens``), or without it the duration in centiseconds. A recording
    asked several questions (``expand_questions``: several rows with its id) is opened once; a ``seconds`` column
    (:func:`checked`) is used as it is. With ``unreadable_seconds`` a recording whose header cannot be read counts
    that long instead of stopping the run (evaluation: its batch fails later and is counted)."""
    if "seconds" in ds.column_names:
        durations = list(ds["seconds"])
        ds = ds.remove_columns("seconds")
    else:
        seconds: dict[str, float] = {}
        cells = ds.select_columns(["id", "audio"]).to_dict()  # (lists: a Column's items are read one by one)
        for utt, audio in zip(cells["id"], cells["audio"], strict=True):
            if utt not in seconds:
                try:
                    seconds[utt] = check_audio_file(audio, utt)
                except DataError:
                    if unreadable_seconds is None:
                        raise
                    seconds[utt] = unreadable_seconds
        durations = [seconds[u] for u in cells["id"]]
    if num_tokens is None:
        lengths = [round(100 * d) for d in durations]
    else:
        rows = ds.remove_columns("audio").to_list()
        lengths = [num_tokens(r, d) for r, d in zip(rows, durations, strict=True)]
    return ds.add_column("seconds", durations).add_column("length", lengths)


def expand_questions(ds: Dataset, questions: Sequence[str]) -> Dataset:
    """Each recording once per question (the ``question`` column): the paper's task trains on an APA and an MDD
    sample of every recording. A single-question task keeps one row per recording."""
    from datasets import concatenate_datasets

    return concatenate_datasets([ds.add_column("question", [name] * len(ds)) for name in questions])
