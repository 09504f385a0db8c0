"""What the benchmark trains on where the real files cannot be downloaded: a full-size random-weight checkpoint in
the published layout, and a synthetic corpus in the release layout. Both are read by the unchanged loading code
(``model.name_or_path=<folder>``, ``data.path=<folder>``), so a benchmark row is a ``phi4_pron.train`` command.

Speed and memory do not depend on weight values. The checkpoint's sizes are Phi-4-multimodal-instruct's (32 layers,
hidden 3072, 24 heads, 8 KV heads, vocabulary 200064, tied embeddings, the full audio and vision encoders); its
tokenizer is a 4096-token BPE learnt from the tasks' texts and the corpus (the real one is not available offline), so
prompts take about as many tokens as real words; every row reports its tokens per sample.
The corpus repeats the bundled recordings' texts and annotations with noise audio: each recording as long as the
bundled one of the same text times a log-normal factor (sigma 0.25, another speaker's pace), scaled to the
speechocean762 train split's mean of 4.1 s (or every recording ``seconds`` long, for memory).
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import torch

from phi4_pron.config import REPO_ROOT
from phi4_pron.results import atomic_folder
from phi4_pron.tiny_model import AUDIO_TOKEN, BOS_EOS, IMAGE_TOKEN, build_tokenizer, write_checkpoint

MINI = REPO_ROOT / "data" / "speechocean762-mini"
SPLIT_RECORDINGS = 2500  # speechocean762's train and test splits: 2500 recordings each
MEAN_SECONDS = 4.1  # the train split's mean duration
STAND_IN_VERSION = "full-v1"


def full_config(tokenizer):
    """Phi4MultimodalConfig with Phi-4-multimodal-instruct's sizes (its defaults, and where config.json differs)."""
    from transformers import Phi4MultimodalConfig

    eos, end = tokenizer.convert_tokens_to_ids(BOS_EOS), tokenizer.convert_tokens_to_ids("<|end|>")
    return Phi4MultimodalConfig(
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        bos_token_id=eos,
        eos_token_id=[eos, end],
        pad_token_id=eos,
        audio_config={"audio_token_id": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)},
        vision_config={"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)},
    )


def ensure_full_checkpoint(out_dir: Path) -> Path:
    """The full-size random checkpoint at ``out_dir`` (built on the GPU, about 12 GB, once)."""
    marker = {"version": STAND_IN_VERSION, "what": "full-size random-weight stand-in (phi4_pron.bench)"}
    if (out_dir / "TINY_MODEL.json").exists():
        return out_dir
    tokenizer = build_tokenizer(MINI, vocab_size=4096)
    return write_checkpoint(
        out_dir,
        tokenizer,
        full_config(tokenizer),
        seed=0,
        marker=marker,
        dtype=torch.bfloat16,
        device="cuda" if torch.cuda.is_available() else "cpu",
        max_shard_size="5GB",
    )


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def ensure_corpus(out_dir: Path, n: int = SPLIT_RECORDINGS, seconds: float | None = None, seed: int = 1) -> Path:
    """A corpus in the speechocean762 release layout (``WAVE/``, ``train/`` and ``test/`` with ``wav.scp`` and
    ``text``, ``resource/scores.json``), ``n`` recordings in each split (the same ones)."""
    if (out_dir / "resource" / "scores.json").exists():
        return out_dir
    scores = json.loads((MINI / "resource" / "scores.json").read_text())
    texts = dict(line.split(maxsplit=1) for line in (MINI / "train" / "text").read_text().splitlines() if line)
    wavs = dict(line.split(maxsplit=1) for line in (MINI / "train" / "wav.scp").read_text().splitlines() if line)
    source = sorted(wavs)
    spoken = []
    for utt in source:
        with wave.open(str(MINI / wavs[utt].strip())) as w:
            spoken.append(w.getnframes() / w.getframerate())
    rng = np.random.default_rng(seed)
    durations = np.array(spoken)[np.arange(n) % len(source)] * rng.lognormal(0.0, 0.25, n)
    durations = np.clip(durations * MEAN_SECONDS / durations.mean(), 1.0, 20.0) if seconds is None else [seconds] * n
    with atomic_folder(out_dir) as tmp:
        (tmp / "WAVE" / "SPEAKER9999").mkdir(parents=True)
        (tmp / "resource").mkdir()
        table, text_lines, scp_lines = {}, [], []
        for i in range(n):
            utt, like = f"99{i:06d}", source[i % len(source)]
            noise = rng.standard_normal(int(durations[i] * 16_000)) * 0.05
            _write_wav(tmp / "WAVE" / "SPEAKER9999" / f"{utt}.WAV", noise)
            table[utt] = scores[like]
            text_lines.append(f"{utt} {texts[like].strip()}\n")
            scp_lines.append(f"{utt} WAVE/SPEAKER9999/{utt}.WAV\n")
        (tmp / "resource" / "scores.json").write_text(json.dumps(table))
        for split in ("train", "test"):
            (tmp / split).mkdir()
            (tmp / split / "text").write_text("".join(text_lines))
            (tmp / split / "wav.scp").write_text("".join(scp_lines))
        (tmp / "README.md").write_text(
            "Synthetic corpus (phi4_pron.bench): noise audio with the bundled speechocean762-mini texts and "
            "annotations. For speed and memory only; no metric on it means anything.\n"
        )
    return out_dir
