"""Speed and memory of the framework's own training and evaluation code on the full-size model.

    python -m phi4_pron.bench train  [--out experiments/benchmarks]   # s/step, s/epoch, TFLOP/s, peak GiB
    python -m phi4_pron.bench memory [--out ...]                      # every hardware preset x LoRA config
    python -m phi4_pron.bench eval   [--out ...]                      # seconds to answer the 2500 test utterances
    python -m phi4_pron.bench train --tiny                            # the same code on the tiny model (CPU check)

No download: the full-size Phi4Multimodal is built from the checkpoint's config values with random weights
(speed does not depend on weight values). Prompts and answers are real: the bundled corpus's texts and
annotations through ``phi4_pron.answer``; audio is noise of the train split's duration distribution (mean
4.1 s). Tokens come from a 4096-token byte-level BPE trained on the same texts (the real tokenizer is not
available offline), so the token counts per sample are printed with every result. Training runs through
``sft_config`` + TRL's SFTTrainer + the collator; evaluation through ``evaluation.generate_records`` + ``score``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi4_pron.config import REPO_ROOT
from phi4_pron.data import SAMPLING_RATE

MINI = REPO_ROOT / "data" / "speechocean762-mini"
EPOCH_UTTERANCES = 2500  # speechocean762 train (and test) split size
CARD_GIB = {"a100": 80.0, "a6000": 48.0, "2x4090": 24.0, "h100": 79.6}  # memory of one card
LORA_TARGETS = r".*model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
# Phi-4-multimodal-instruct's config.json values where they differ from Phi4MultimodalConfig's defaults.
REAL_CONFIG = {
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
}


def versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "cuda": str(torch.version.cuda),
    }


def bench_tokenizer(tiny: bool):
    """Tiny: the tiny model's tokenizer. Full size: 4096 BPE tokens learnt from the corpus's prompts and answers."""
    from phi4_pron.answer import prompt_text, target_answer
    from phi4_pron.data import load_split
    from phi4_pron.tiny_model import build_tokenizer

    if tiny:
        return build_tokenizer(MINI)
    rows = load_split(str(MINI), "train").remove_columns("audio").to_list()
    text = [prompt_text(r["text"]) for r in rows] + [target_answer(r) for r in rows]
    return build_tokenizer(MINI, vocab_size=4096, extra_text=text * 20)


def build_model(tokenizer, tiny: bool, attn: str):
    """A random-weight Phi4MultimodalForCausalLM: the real sizes, or the tiny test sizes."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    from phi4_pron.modeling import keep_sdpa_off_cudnn
    from phi4_pron.tiny_model import build_config

    keep_sdpa_off_cudnn()
    if tiny:
        config = build_config(tokenizer)
    else:
        audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
        config = Phi4MultimodalConfig(
            **REAL_CONFIG,
            audio_config={"audio_token_id": audio_id},
            vision_config={"image_token_id": tokenizer.convert_tokens_to_ids("<|image|>")},
        )
    config._attn_implementation = attn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi4MultimodalForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device)


def synthetic_rows(n: int, seed: int, seconds: float | None = None) -> list[dict[str, Any]]:
    """Corpus texts and annotations (real) with noise audio, ``seconds`` long or as long as real speech.

    Real: the duration of the corpus's own recording of the same text times a log-normal factor (sigma 0.25, another
    speaker's pace), scaled to the train split's mean of 4.1 s, so that longer texts take longer, as in the corpus.
    """
    import wave

    from phi4_pron.data import load_split

    rng = np.random.default_rng(seed)
    corpus = load_split(str(MINI), "train")
    spoken = []
    for audio in corpus["audio"]:  # the corpus's WAV headers (no torchcodec needed on the benchmark machine)
        with wave.open(audio["path"]) as w:
            spoken.append(w.getnframes() / w.getframerate())
    spoken = np.array(spoken)
    corpus = corpus.remove_columns("audio").to_list()
    durations = spoken[np.arange(n) % len(corpus)] * rng.lognormal(0.0, 0.25, n)
    durations = np.clip(durations * 4.1 / durations.mean(), 1.0, 20.0)
    rows = []
    for i in range(n):
        row = dict(corpus[i % len(corpus)])
        dur = seconds or float(durations[i])
        row["audio"] = (rng.standard_normal(int(dur * SAMPLING_RATE)) * 0.05).astype(np.float32)
        row["id"] = f"bench-{i:05d}"
        rows.append(row)
    return rows


def padding_of(trainer, tokens: list[int], batch: int, steps: int) -> tuple[float, float]:
    """Mean real tokens per sample and padded/real - 1 over the run's first ``steps`` batches (the sampler's order),
    each batch as wide as the trainer's collator pads it."""
    order = list(trainer._get_train_sampler(trainer.train_dataset))[: batch * steps]
    real = padded = 0
    for i in range(0, len(order), batch):
        n = [tokens[j] for j in order[i : i + batch]]
        real, padded = real + sum(n), padded + trainer.data_collator.padded_length(max(n)) * len(n)
    return real / len(order), padded / real - 1


def lm_params(model) -> int:
    """Parameters of the language model that take part in each token's FLOPs (decoder layers + LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(p.numel() for name, p in base.named_parameters() if ".layers." in name and "embed" not in name)
    return n + base.lm_head.weight.numel()


class StepTimer:
    """Trainer callback: wall time of the optimizer steps after the warm-up ones, CUDA-synchronised only at the
    start and the end of that window (a sync per step would drain the GPU's queue, which training never does)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self
        self.warmup, self.begin, self.start, self.end, self.steps = warmup, math.nan, math.nan, math.nan, 0

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                _sync()
                timer.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    _sync()
                    timer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                _sync()
                timer.end = time.perf_counter()
                timer.steps = state.global_step - timer.warmup

        self.callback = _CB()

    @property
    def warmup_s(self) -> float:
        return self.start - self.begin

    @property
    def step_s(self) -> float:
        return (self.end - self.start) / self.steps if self.steps > 0 else math.nan


class StepProfiler:
    """Trainer callback: torch.profiler over one optimizer step after the warm-up: kernel tables (by GPU and by CPU
    time), the GPU's busy time, and a Chrome trace (``<name>.json.gz``, for chrome://tracing or Perfetto)."""

    def __init__(self, first_step: int, trace: Path):
        from transformers import TrainerCallback

        self.first, self.trace, self.table, self.busy_s = first_step, trace, "", math.nan
        prof = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == prof.first:
                    from torch.profiler import ProfilerActivity, profile

                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                    prof.profiler = profile(activities=acts)
                    prof.profiler.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == prof.first + 1 and hasattr(prof, "profiler"):  # before StepTimer's start
                    _sync()
                    prof.profiler.__exit__(None, None, None)
                    prof.summarise(prof.profiler)

        self.callback = _CB()

    def summarise(self, p) -> None:
        from torch.autograd import DeviceType

        kernels = [e for e in p.events() if e.device_type == DeviceType.CUDA]
        self.busy_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 if kernels else math.nan
        averages = p.key_averages()
        self.table = "\n".join(
            averages.table(sort_by=key, row_limit=40, max_name_column_width=90)
            for key in (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]
        )
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        p.export_chrome_trace(str(self.trace))  # gzipped: the name ends in .gz


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_training_setting(
    setting: dict[str, Any],
    tokenizer,
    feature_extractor,
    tiny: bool,
    steps: int,
    warmup: int,
    seconds: float | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps with the framework's trainer and collator.

    Each optimizer step takes the paper's effective batch of 64 (``batch`` x accumulation, as ``sft_config`` derives
    it); tiny: one batch per step. ``setting`` may also name: ``trainer: trl`` (TRL's SFTTrainer itself),
    ``optimizer``, ``nan_filter``, ``pad_to`` (the collator's), ``group_by: duration``, ``dropout``, ``compile``,
    ``workers``, ``cache_audio`` (the audio embeddings computed once, in batches of ``cache_batch``, as training
    does). ``profile``: a kernel table there and a Chrome trace beside it.
    """
    from datasets import Dataset
    from omegaconf import OmegaConf
    from trl import SFTTrainer

    from phi4_pron.audio_cache import cache_audio_embeddings
    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.modeling import attach_speech_lora, compile_layers
    from phi4_pron.trainer import PronunciationTrainer
    from phi4_pron.training import sft_config

    effective = setting["batch"] if tiny else setting.get("effective_batch", 64)
    accum = effective // setting["batch"]
    cfg = OmegaConf.create(
        {
            "run_name": "bench",
            "seed": 0,
            "optim": {
                "epochs": 1,
                "max_steps": warmup + steps,
                "lr": 2e-5,
                "optimizer": setting.get("optimizer", "adamw_torch_fused"),
                "weight_decay": 0.0,
                "warmup_ratio": 0.0,
                "lr_scheduler": "linear",
                "max_grad_norm": 1.0,
                "effective_batch_size": effective,
            },
            "data": {"group_by_length": setting.get("group_by_length", False)},
            "hardware": {
                "per_device_train_batch_size": setting["batch"],
                "bf16": torch.cuda.is_available(),
                "num_gpus": int(torch.cuda.is_available()),
                "gradient_checkpointing": setting["checkpointing"],
                "dataloader_num_workers": setting.get("workers", 8) if torch.cuda.is_available() else 0,
            },
            "logger": {"logging_steps": 1000, "wandb": {"enabled": False}},
        }
    )
    _free()
    model = build_model(tokenizer, tiny, setting["attn"])
    lora = OmegaConf.create(
        {
            "init": "fresh",
            "r": setting["r"],
            "alpha": 2 * setting["r"],
            "dropout": setting.get("dropout", 0.05),
            "target_modules": LORA_TARGETS,
        }
    )
    model = attach_speech_lora(model, lora, path="")
    batches = accum * (warmup + steps)
    # a whole epoch's rows, so that length grouping sees what it sees in training (memory mode, tiny: just enough)
    n_rows = setting["batch"] * batches if seconds or tiny else EPOCH_UTTERANCES
    rows = synthetic_rows(n_rows, seed=1, seconds=seconds)
    collator = PronunciationCollator(tokenizer, feature_extractor, pad_to_multiple_of=setting.get("pad_to", 8))
    tokens = [collator.num_tokens(r, len(r["audio"]) / SAMPLING_RATE) for r in rows]
    # the grouping key: the framework's (data.with_lengths + collator.num_tokens), or the previous one (duration)
    lengths = [len(r["audio"]) // 160 for r in rows] if setting.get("group_by") == "duration" else tokens
    sample = collator(rows[:64])  # the answer and audio shares of the tokens
    n_audio = float(sample["audio_embed_sizes"].float().mean())
    n_answer = float((sample["labels"] != -100).sum(1).float().mean())
    dataset = Dataset.from_list(
        [{**r, "length": n, "seconds": len(r["audio"]) / SAMPLING_RATE} for r, n in zip(rows, lengths, strict=True)]
    )
    audio_table, cache_s = None, math.nan
    if setting.get("cache_audio"):  # as training does: before the first step, batches of the eval batch size
        _sync()
        t0 = time.perf_counter()
        workers = cfg.hardware.dataloader_num_workers
        dataset, collator, audio_table = cache_audio_embeddings(
            model, dataset, collator, batch_size=setting.get("cache_batch", 256), num_workers=workers
        )
        _sync()
        cache_s = time.perf_counter() - t0
    if setting.get("compile"):
        compile_layers(model, audio=audio_table is None)
    trainer_cls = SFTTrainer if setting.get("trainer") == "trl" else PronunciationTrainer
    with tempfile.TemporaryDirectory() as tmp:
        args = sft_config(cfg, Path(tmp), 1)
        args.save_strategy = "no"
        args.report_to = []
        if "nan_filter" in setting:
            args.logging_nan_inf_filter = setting["nan_filter"]
        timer = StepTimer(warmup)
        profiler = StepProfiler(warmup - 1, profile.with_suffix(".trace.json.gz")) if profile else None
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[*([profiler.callback] if profiler else []), timer.callback],
            **({"audio_table": audio_table} if audio_table is not None else {}),
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        n_tokens, padding = padding_of(trainer, tokens, setting["batch"], batches)
    # wall time per optimizer step after the warm-up (compilation) steps, data loading included
    step_s = timer.step_s
    samples_per_step = setting["batch"] * accum
    result = {
        **setting,
        "grad_accum": accum,
        "s_per_step": step_s,
        "warmup_s": timer.warmup_s,
        "audio_cache_s": cache_s,
        "samples_per_s": samples_per_step / step_s,
        "epoch_s": EPOCH_UTTERANCES / samples_per_step * step_s,
        "tflops": 4 * lm_params(model) * n_tokens * samples_per_step / step_s / 1e12,
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else math.nan,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else math.nan,
        "tokens_per_sample": round(n_tokens, 1),
        "padding": round(padding, 3),
        "audio_tokens": round(n_audio, 1),
        "answer_tokens": round(n_answer, 1),
        "trainable_params": model.get_nb_trainable_parameters()[0],
    }
    if profiler:
        from phi4_pron.results import write_text_atomic

        result["gpu_busy_s_per_step"] = profiler.busy_s
        write_text_atomic(profile, f"{setting['setting']} ({setting['lora']})\n{profiler.table}")
    del trainer, model
    _free()
    return result


def _train(setting: str, lora: str, attn: str, checkpointing: bool, batch: int, grouped: bool = False, **kw) -> dict:
    r = {"r320": 320, "r64": 64}[lora]
    return {
        "setting": setting,
        "lora": lora,
        "r": r,
        "attn": attn,
        "checkpointing": checkpointing,
        "batch": batch,
        "group_by_length": grouped,
        "dropout": 0.01 if r == 320 else 0.05,
        **kw,
    }


def _preset(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO_ROOT / "conf" / "hardware" / f"{name}.yaml").read_text())


def _preset_train(name: str, lora: str, label: str = "", **changes) -> dict[str, Any]:
    hw = _preset(name)
    setting = _train(
        f"{name} preset: {hw['attn_implementation']}, compile={hw['compile']}, "
        f"checkpointing={hw['gradient_checkpointing']}, batch {hw['per_device_train_batch_size']}, length-grouped, "
        "audio embeddings cached",
        lora,
        hw["attn_implementation"],
        hw["gradient_checkpointing"],
        hw["per_device_train_batch_size"],
        True,
        compile=hw["compile"],
        workers=hw["dataloader_num_workers"],
        cache_audio=hw.get("cache_audio_embeddings", True),
        cache_batch=hw["per_device_eval_batch_size"],
    )
    return {**setting, **changes, **({"setting": f"{name} preset {label}"} if label else {})}


TRAIN_SETTINGS = [  # the original recipe first (the baseline), then the framework's presets
    _train("original recipe: eager + checkpointing, batch 8", "r320", "eager", True, 8),
    _train("original recipe: eager + checkpointing, batch 8", "r64", "eager", True, 8),
    _preset_train("h100", "r64"),
    _preset_train("h100", "r320"),
    _preset_train("h100", "r64", "with the audio encoder at every step", cache_audio=False),
    _preset_train("h100", "r64", "without compile", compile=False),  # last: the tiny bench runs the first and last
]


# Fallbacks measured beside each preset, so a preset that does not fit can be changed to a measured one.
CANDIDATES = {
    "a100": [(16, False)],
    "h100": [(16, False)],
    "a6000": [(16, True), (8, False)],
    "2x4090": [(2, True), (1, True)],
}


def preset_settings(with_candidates: bool = True) -> list[dict[str, Any]]:
    """Each hardware preset's per-device settings (and fallbacks) x each LoRA config."""
    out = []
    for preset in CARD_GIB:
        hw = _preset(preset)
        options = [(hw["per_device_train_batch_size"], hw["gradient_checkpointing"], "preset")]
        options += [(b, c, "candidate") for b, c in CANDIDATES[preset]] if with_candidates else []
        for batch, ckpt, kind in options:
            for lora, r in (("r320", 320), ("r64", 64)):
                out.append(
                    {
                        "setting": f"{kind} {preset}",
                        "preset": preset,
                        "lora": lora,
                        "r": r,
                        "attn": hw["attn_implementation"],
                        "checkpointing": ckpt,
                        "compile": hw.get("compile", False),
                        "batch": batch,
                        "dropout": 0.01 if r == 320 else 0.05,
                    }
                )
    return out


class ReferenceAnswerLength:
    """Stopping criterion: each row stops after as many tokens as its reference answer (+ ``<|end|>``).

    Random weights never emit ``<|end|>``; a trained model does, at about its reference answer's length. Rows are
    recognised by their prompt's text tokens (audio placeholders and padding left out).
    """

    def __init__(self, tokenizer, rows: list[dict[str, Any]]):
        from phi4_pron.answer import AUDIO_PLACEHOLDER, prompt_text, target_answer

        self.skip = {tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER), tokenizer.pad_token_id, tokenizer.eos_token_id}
        self.targets: dict[tuple[int, ...], int] = {}
        for r in rows:
            ids = tokenizer(prompt_text(r["text"]), add_special_tokens=False)["input_ids"]
            answer = tokenizer(target_answer(r), add_special_tokens=False)["input_ids"]
            self.targets[tuple(t for t in ids if t not in self.skip)] = len(answer) + 1
        self.start, self.seen, self.lengths = 0, 0, None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.lengths is None or input_ids.shape[1] <= self.seen:  # a new generate call: read its prompts
            self.start = input_ids.shape[1] - 1
            prompts = input_ids[:, : self.start].tolist()
            self.lengths = torch.tensor(
                [self.targets[tuple(t for t in p if t not in self.skip)] for p in prompts], device=input_ids.device
            )
        self.seen = input_ids.shape[1]
        return (input_ids.shape[1] - self.start) >= self.lengths


def eval_model(tokenizer, tiny: bool, attn: str, merged: bool = True):
    """The model as evaluation sees a trained r64 run (a fresh r64 speech LoRA), in eval mode; ``merged`` as
    ``inference.load_adapter_for_inference`` loads it: LoRA folded in, ``sdpa`` as the decoding attention."""
    from omegaconf import OmegaConf

    from phi4_pron.inference import DECODE_ATTENTION
    from phi4_pron.modeling import attach_speech_lora

    model = build_model(tokenizer, tiny, attn)
    lora = OmegaConf.create({"init": "fresh", "r": 64, "alpha": 128, "dropout": 0.05, "target_modules": LORA_TARGETS})
    model = attach_speech_lora(model, lora, path="")
    if merged:
        model = model.merge_and_unload()
        if attn == "sdpa":
            model.set_attn_implementation(DECODE_ATTENTION)
    return model.eval()


def run_eval_setting(setting: dict[str, Any], tokenizer, feature_extractor, tiny: bool, n: int) -> dict[str, Any]:
    """Generate and score ``n`` utterances; the time is scaled to the 2500-utterance test split."""
    import functools

    from transformers import StoppingCriteriaList

    from phi4_pron.evaluation import generate_records, score

    _free()
    model = eval_model(tokenizer, tiny, setting["attn"], merged=bool(setting.get("merged")))
    rows = synthetic_rows(n, seed=2)
    if setting.get("answer_lengths"):
        stop = StoppingCriteriaList([ReferenceAnswerLength(tokenizer, rows)])
        model.generate = functools.partial(model.generate, stopping_criteria=stop)
    workers = setting.get("workers", 0) if torch.cuda.is_available() else 0
    run = functools.partial(
        generate_records,
        model,
        tokenizer,
        feature_extractor,
        batch_size=setting["batch"],
        max_new_tokens=setting["max_new_tokens"],
        progress=False,
        num_workers=workers,
        compiled=bool(setting.get("compiled")),
    )
    t0 = time.perf_counter()
    # allocator and kernel warm-up; compiled: the compile, for the shape of the split's longest texts
    warm = run(sorted(rows, key=lambda r: len(r["text"]))[-setting["batch"] :])
    _sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = run(rows)
    score(records)
    _sync()
    elapsed = time.perf_counter() - t0
    result = {
        **setting,
        "n": n,
        "seconds": elapsed,
        "samples_per_s": n / elapsed,
        "test_eval_s": elapsed * EPOCH_UTTERANCES / n,
        "warmup_s": warmup_s,
        "failed": sum(r["error"] is not None for r in records) + sum(r["error"] is not None for r in warm),
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else math.nan,
    }
    del model
    _free()
    return result


def _eval(setting: str, batch: int, n: int, merged: bool = True, workers: int = 8, **kw) -> dict[str, Any]:
    return {
        "setting": setting,
        "attn": "sdpa",
        "batch": batch,
        "max_new_tokens": 128,
        "n": n,
        "merged": merged,
        "workers": workers,
        **kw,
    }


EVAL_SETTINGS = [  # the original way first (the baseline), then the framework's evaluation
    _eval("original: generate, LoRA unmerged, batch 8, in order, 128 new tokens", 8, 16, merged=False, workers=0),
    _eval("framework: merged, batch 256, by length, 8 workers, 128 new tokens (upper bound)", 256, 2500),
    _eval("framework: merged, batch 256, by length, 8 workers, reference-length answers", 256, 2500, answer_lengths=1),
    _eval("framework: merged, batch 512, by length, 8 workers, reference-length answers", 512, 2500, answer_lengths=1),
    _eval(
        "framework: merged, batch 256, by length, 8 workers, reference-length answers, compiled decoding",
        256,
        2500,
        answer_lengths=1,
        compiled=1,
    ),
]


def markdown(results: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in results]
    return "\n".join(lines) + "\n"


COLUMNS = {
    "train": [
        "setting",
        "lora",
        "batch",
        "grad_accum",
        "s_per_step",
        "epoch_s",
        "audio_cache_s",
        "samples_per_s",
        "tflops",
        "peak_gib",
        "tokens_per_sample",
        "padding",
        "audio_tokens",
        "answer_tokens",
    ],
    "memory": [
        "setting",
        "preset",
        "lora",
        "batch",
        "attn",
        "checkpointing",
        "peak_gib",
        "card_gib",
        "headroom",
        "fits",
    ],
    "eval": [
        "setting",
        "batch",
        "max_new_tokens",
        "n",
        "seconds",
        "samples_per_s",
        "test_eval_s",
        "warmup_s",
        "failed",
        "peak_gib",
    ],
}


def main(argv: list[str] | None = None) -> None:
    import sys

    from transformers import Phi4MultimodalFeatureExtractor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "memory", "eval"])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the code path, not speed")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=512, help="utterances per eval setting without its own n")
    p.add_argument("--max-seconds", type=float, default=15.0, help="audio length of every sample in memory mode")
    p.add_argument("--only", type=int, nargs="*", help="indices of the settings to run")
    p.add_argument("--no-candidates", action="store_true", help="memory: the presets' own settings only")
    p.add_argument("--out", type=Path, help="folder for <mode>.json and <mode>.md")
    p.add_argument("--profile", action="store_true", help="train: kernel tables in <out>/profile-<i>.txt (2 steps)")
    a = p.parse_args(argv)

    tokenizer = bench_tokenizer(a.tiny)
    fe = Phi4MultimodalFeatureExtractor()
    settings = {"train": TRAIN_SETTINGS, "memory": preset_settings(not a.no_candidates), "eval": EVAL_SETTINGS}[a.mode]
    if a.tiny:  # small shapes: the CPU only checks that every path runs
        settings = [
            {**s, "r": min(s.get("r", 8), 8), "batch": 2, "max_new_tokens": 4, "compile": False}
            for s in [settings[0], settings[-1]]
        ]
    if a.only:
        settings = [settings[i] for i in a.only]
    results: list[dict[str, Any]] = []
    measured: dict[tuple, dict[str, Any]] = {}  # identical settings (a100 and h100 presets) are measured once
    for s in settings:
        key = (s.get("lora"), s["batch"], s.get("checkpointing"), s["attn"], s.get("compile"))
        try:
            if a.mode == "eval":
                r = run_eval_setting(s, tokenizer, fe, a.tiny, n=4 if a.tiny else s.get("n", a.eval_n))
            elif a.mode == "memory" and key in measured:
                r = {**measured[key], **s}
            else:
                r = measured[key] = run_training_setting(
                    s,
                    tokenizer,
                    fe,
                    a.tiny,
                    steps=min(a.steps, 3) if a.tiny else a.steps,
                    warmup=1 if a.tiny else a.warmup,
                    seconds=a.max_seconds if a.mode == "memory" else None,
                    profile=(a.out or Path(".")) / f"profile-{len(results)}.txt" if a.profile else None,
                )
        except torch.cuda.OutOfMemoryError as e:
            r = {**s, "error": f"out of memory: {str(e)[:160]}", "peak_gib": math.inf}
            _free()
        if a.mode == "memory":
            card = CARD_GIB[s["preset"]]
            r.update(card_gib=card, headroom=1 - r["peak_gib"] / card, fits=r["peak_gib"] <= 0.9 * card)
        r.update(versions(), command="python -m phi4_pron.bench " + " ".join(sys.argv[1:] if argv is None else argv))
        results.append(r)
        print(json.dumps(r), flush=True)
    table = markdown(results, COLUMNS[a.mode])
    print(table)
    if a.out:
        from phi4_pron.results import write_json_atomic, write_text_atomic

        write_json_atomic(a.out / f"{a.mode}.json", results)
        write_text_atomic(a.out / f"{a.mode}.md", table)


if __name__ == "__main__":
    main()
