"""The training run's audio-embedding pass (``audio_cache.cache_audio_embeddings``, which ``train`` runs once before
its first step) over the training split, timed in one process with the recordings read as before 2026-12-02 (every
one by torchcodec, ``codec``) and as now (16 kHz mono PCM WAVs read directly, ``wav``), alternating; results in
$OUT/audio_pass_ab.json.

    python scripts/audio_pass_ab.py --model=DIR --data=DIR [--rounds=2] <train overrides, e.g. hardware=h100 task=paper>
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from phi4_pron import data
from phi4_pron.answer import questions_from_config
from phi4_pron.audio_cache import cache_audio_embeddings
from phi4_pron.bench.measure import compose, sync
from phi4_pron.collator import PronunciationCollator
from phi4_pron.data import expand_questions, load_split, with_lengths
from phi4_pron.modeling import load_base_model, load_tokenizer_and_features


def training_split(argv: list[str]):
    """The composed config, the ``--flags``, the model (bf16 on a GPU), the training collator and the training split
    with its lengths, as ``train`` prepares them for the audio-embedding pass."""
    cfg = compose("train", [a for a in argv if not a.startswith("--")])
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_base_model(flags["model"], None, dtype, "sdpa").to(device).eval()
    tokenizer, features = load_tokenizer_and_features(flags["model"])
    questions = questions_from_config(cfg.task)
    collator = PronunciationCollator(tokenizer, features, questions, max_length=cfg.model.max_length)
    split = with_lengths(expand_questions(load_split(flags["data"], "train"), list(questions)), collator.num_tokens)
    return cfg, flags, model, collator, split


def main(argv: list[str]) -> None:
    cfg, flags, model, collator, split = training_split(argv)
    batch, workers = cfg.hardware.per_device_eval_batch_size, cfg.hardware.dataloader_num_workers
    direct = data._wav_samples
    out = Path(os.environ.get("OUT", "output/bench-results"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for round_ in range(int(flags.get("rounds", 2))):
        for name in ("codec", "wav"):
            data._wav_samples = direct if name == "wav" else lambda audio: None
            sync()
            start = time.perf_counter()
            _, _, table = cache_audio_embeddings(model, split, collator, batch, workers)
            sync()
            rows.append({"variant": name, "round": round_, "seconds": round(time.perf_counter() - start, 2)})
            rows[-1].update(table_rows=table.shape[0], batch=batch, workers=workers)
            print(json.dumps(rows[-1]), flush=True)
            del table
            (out / "audio_pass_ab.json").write_text(json.dumps({"argv": argv, "results": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
