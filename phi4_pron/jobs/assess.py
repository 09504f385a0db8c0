"""The job behind ``python -m phi4_pron.assess``: learners' recordings scored with a trained adapter, the parsed JSON
assessment per recording."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from phi4_pron.answer import join_answers
from phi4_pron.config import DataConfig
from phi4_pron.data import DataError, check_audio_file
from phi4_pron.fast.generation import fast_generation
from phi4_pron.inference import (
    adapter_config,
    batches,
    generate_answers,
    load_adapter_for_inference,
    saved_questions,
)


def requests(cfg: DictConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(recordings to assess, recordings that cannot be) from ``audio``+``text`` or ``audio_dir``+``texts``, each
    checked before any model loads. One recording with a problem stops the job, named; in a folder it is reported
    as failed (its result carries the error) and the others are assessed."""
    if cfg.audio:
        pairs = [(Path(cfg.audio), cfg.text)]
    elif cfg.audio_dir:
        if not cfg.texts:
            raise DataError("audio_dir needs texts=<TSV of '<file name>\\t<text>' lines>.")
        folder, table = Path(cfg.audio_dir), Path(cfg.texts)
        if not table.exists():
            raise DataError(f"texts file {table} does not exist.")
        pairs = []
        for n, line in enumerate(table.read_text().splitlines(), 1):
            if line.strip():
                name, _, text = line.partition("\t")
                if not text.strip():
                    raise DataError(f"{table}:{n}: expected '<file name><TAB><text>', got {line!r}.")
                pairs.append((folder / name.strip(), text))
    else:
        raise DataError("give audio=<file> text=<what was read>, or audio_dir=<folder> texts=<TSV>.")
    rows, bad = [], []
    for audio, text in pairs:
        if not text or not str(text).strip():
            raise DataError(f"empty text for {audio}: give the sentence the learner was asked to read (text=...).")
        row = {"id": audio.name, "audio": str(audio), "text": str(text).strip()}
        try:
            if not audio.exists():
                raise DataError(f"audio file {audio} does not exist.")
            if (seconds := check_audio_file(audio, utt_id=audio.name)) < DataConfig.min_seconds:
                least = DataConfig.min_seconds
                raise DataError(f"{audio} holds {seconds:.3f} s of audio, below the {least} s it needs")
        except DataError as e:
            if cfg.audio:
                raise
            bad.append({**row, "error": f"DataError: {e}"})
            continue
        rows.append(row)
    return rows, bad


def run_assessment(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every question of the adapter's task about each recording, answers joined; each result is written (and
    flushed) as soon as its recording is done, so an interruption loses nothing finished. A recording whose
    generation fails is reported with its error and counted; the others go on."""
    rows, bad = requests(cfg)
    adapter_config(Path(cfg.model_path))  # a folder without an adapter is named before the questions are read
    questions = saved_questions(cfg.model_path)
    for row in bad:
        print(f"not assessed: {row['error']}", file=sys.stderr)
    model, tokenizer, feature_extractor = load_adapter_for_inference(cfg.model_path) if rows else (None, None, None)

    def answer(rows: list[dict[str, Any]]) -> list[str | Exception]:
        """The batch's answers, or row by row where the batch fails (so only the failing recording fails)."""
        try:
            return generate_answers(model, tokenizer, feature_extractor, questions, rows, cfg.max_new_tokens)
        except Exception as e:  # noqa: BLE001
            return [answer([row])[0] for row in rows] if len(rows) > 1 else [e]

    out = open(cfg.out, "w") if cfg.out else sys.stdout  # noqa: SIM115 - closed below
    results, failed = [], 0

    def write(result: dict[str, Any]) -> None:
        out.write(json.dumps(result) + "\n")
        out.flush()
        results.append(result)

    try:
        for row in bad:
            write({"audio": row["audio"], "text": row["text"], "assessment": None, "raw": None, "error": row["error"]})
            failed += 1
        for batch in batches(rows, cfg.batch_size):
            with fast_generation(model):
                answers = {q: answer([{**row, "question": q} for row in batch]) for q in questions}
            for i, row in enumerate(batch):
                raw, parsed, error = join_answers({q: answers[q][i] for q in questions}, questions)
                write({"audio": row["audio"], "text": row["text"], "assessment": parsed, "raw": raw, "error": error})
                failed += error is not None
    finally:
        if cfg.out:
            out.close()
    if cfg.out:
        print(f"wrote {len(results)} assessments ({failed} failed) to {cfg.out}", file=sys.stderr)
    return results
