"""Score learners' recordings with a trained adapter: the parsed JSON assessment per recording."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from phi4_pron.answer import parse_answer
from phi4_pron.data import DataError, check_audio_file
from phi4_pron.inference import batches, generate_answers, load_adapter_for_inference
from phi4_pron.io import write_text_atomic


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
    rows = requests(cfg)
    model, tokenizer, feature_extractor = load_adapter_for_inference(cfg.model_path)
    results = []
    for batch in batches(rows, cfg.batch_size):
        for row, raw in zip(
            batch, generate_answers(model, tokenizer, feature_extractor, batch, cfg.max_new_tokens), strict=True
        ):
            results.append({"audio": row["audio"], "text": row["text"], "assessment": parse_answer(raw), "raw": raw})
    lines = "".join(json.dumps(r) + "\n" for r in results)
    if cfg.out:
        write_text_atomic(cfg.out, lines)
        print(f"wrote {len(results)} assessments to {cfg.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return results
