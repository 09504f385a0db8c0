"""Score learners' recordings with a trained adapter: the parsed JSON assessment per recording."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from phi4_pron.answer import join_parsed
from phi4_pron.data import DataError, check_audio_file
from phi4_pron.inference import batches, generate_answers, load_adapter_for_inference


def requests(cfg: DictConfig) -> list[dict[str, Any]]:
    """(audio, text) pairs from ``audio``+``text`` or ``audio_dir``+``texts``, each checked before any model loads."""
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
    rows = []
    for audio, text in pairs:
        if not text or not str(text).strip():
            raise DataError(f"empty text for {audio}: give the sentence the learner was asked to read (text=...).")
        if not audio.exists():
            raise DataError(f"audio file {audio} does not exist.")
        check_audio_file(audio, utt_id=audio.name)
        rows.append({"id": audio.name, "audio": str(audio), "text": str(text).strip()})
    return rows


def run_assessment(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every question of the adapter's task about each recording, answers joined; each result is written (and
    flushed) as soon as its recording is done, so an interruption loses nothing finished. A recording whose
    generation fails is reported with its error and counted; the others go on."""
    rows = requests(cfg)
    model, tokenizer, feature_extractor, questions = load_adapter_for_inference(cfg.model_path)
    out = open(cfg.out, "w") if cfg.out else sys.stdout  # noqa: SIM115 - closed below
    results, failed = [], 0
    try:
        for batch in batches(rows, cfg.batch_size):
            answers = {}
            for name in questions:
                asked = [{**row, "question": name} for row in batch]
                try:
                    texts = generate_answers(model, tokenizer, feature_extractor, questions, asked, cfg.max_new_tokens)
                except Exception:  # noqa: BLE001 - one recording at a time, to name the one that fails
                    texts = [
                        _one(model, tokenizer, feature_extractor, questions, row, cfg.max_new_tokens) for row in asked
                    ]
                answers[name] = texts
            for i, row in enumerate(batch):
                raw = {name: answers[name][i] for name in questions}
                errors = {q: str(a) for q, a in raw.items() if isinstance(a, Exception)}
                failed += bool(errors)
                result = {
                    "audio": row["audio"],
                    "text": row["text"],
                    "assessment": None if errors else join_parsed({q: questions[q].parse(a) for q, a in raw.items()}),
                    "raw": {q: None if isinstance(a, Exception) else a for q, a in raw.items()},
                    "error": "; ".join(f"{q}: {e}" for q, e in errors.items()) or None,
                }
                out.write(json.dumps(result) + "\n")
                out.flush()
                results.append(result)
    finally:
        if cfg.out:
            out.close()
    if cfg.out:
        print(f"wrote {len(results)} assessments ({failed} failed) to {cfg.out}", file=sys.stderr)
    return results


def _one(model, tokenizer, feature_extractor, questions, row, max_new_tokens) -> str | Exception:
    try:
        return generate_answers(model, tokenizer, feature_extractor, questions, [row], max_new_tokens)[0]
    except Exception as e:  # noqa: BLE001
        return e
