"""``bench floor``: the least time a training epoch can take on this GPU. The language model alone runs forward and
backward over a sample of the epoch's own micro-batches (their widths and answer tokens as ``phi4_pron.train``
makes them: length-grouped, padded to 8), its decoder layers compiled as training compiles them, the loss over the
answer tokens only. Nothing else runs: no data loading, no Trainer, no optimizer step, no audio encoder. A training
row of the same settings can only be slower; the gap between the two is what the framework costs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from phi4_pron.bench.measure import compose, free_memory, peak_gib, sync


def epoch_shapes(cfg) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """Every micro-batch of an epoch of ``cfg`` as (batch, padded width, [(row length, answer tokens, audio feature
    frames, audio embeddings)]), in the length-grouped order the Trainer's sampler gives (audio counted from the
    recordings' durations, as the feature extractor counts it)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from phi4_pron.answer import questions_from_config
    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.data import expand_questions, load_split, with_lengths
    from phi4_pron.jobs.train import model_path
    from phi4_pron.modeling import load_tokenizer_and_features

    path = model_path(cfg.model)
    tokenizer, fe = load_tokenizer_and_features(path, None if Path(path).is_dir() else cfg.model.revision)
    questions = questions_from_config(cfg.task)
    collator = PronunciationCollator(tokenizer, fe, questions)
    prompt_only = PronunciationCollator(tokenizer, fe, questions, with_answer=False)
    ds = with_lengths(expand_questions(load_split(cfg.data.path, cfg.data.train_split), list(questions)))
    rows = ds.remove_columns("audio").to_list()
    full = [collator.num_tokens(r, r["seconds"]) for r in rows]
    answer = [n - prompt_only.num_tokens(r, r["seconds"]) for n, r in zip(full, rows, strict=True)]
    frames, n_audio = zip(*(collator.audio_sizes(r["seconds"]) for r in rows), strict=True)
    batch = cfg.hardware.per_device_train_batch_size
    accumulation = cfg.optim.effective_batch_size // batch
    torch.manual_seed(cfg.seed)
    order = list(LengthGroupedSampler(batch * accumulation, lengths=full))
    out = []
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        width = collator.padded_length(max(full[j] for j in idx))
        out.append((len(idx), width, [(full[j], answer[j], frames[j], n_audio[j]) for j in idx]))
    return out


def _sample(shapes: list, n: int) -> list:
    """``n`` micro-batches spread evenly over the epoch's widths (their mean time stands for the epoch's)."""
    by_width = sorted(shapes, key=lambda s: s[1])
    return [by_width[int((k + 0.5) * len(by_width) / n)] for k in range(min(n, len(by_width)))]


def _step(model, shape, vocab: int, audio: bool = False) -> None:
    """One micro-batch forward and backward: random token embeddings in (``audio``: random log-mel features through
    the audio encoder and projector into each row's audio positions), the loss over each row's answer tokens."""
    batch, width, rows = shape
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = lm.lm_head.weight
    embeds = torch.randn(batch, width, lm.config.hidden_size, device=weight.device, dtype=weight.dtype)
    embeds.requires_grad_()  # as compile_layers' enable_input_require_grads: gradients reach the first layer
    if audio:
        frames = torch.tensor([f for _, _, f, _ in rows])
        features = torch.randn(batch, int(frames.max()), lm.config.audio_config.input_size, device=weight.device)
        mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(weight.device)
        ids = torch.zeros(batch, width, dtype=torch.long)
        for i, (*_, n_audio) in enumerate(rows):
            ids[i, 3 : 3 + n_audio] = lm.config.audio_config.audio_token_id  # after <|user|><|APA|>, as prompts
        sizes = torch.tensor([n for *_, n in rows], device=weight.device)
        embeds = lm.model.embed_tokens_extend.audio_embed(ids.to(weight.device), embeds, features, sizes, mask)
    hidden = lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    positions = torch.cat([torch.arange(n - a - 1, n - 1) + i * width for i, (n, a, *_) in enumerate(rows)])
    logits = lm.lm_head(hidden.reshape(-1, hidden.shape[-1])[positions.to(weight.device)]).float()
    targets = torch.randint(0, vocab, (len(positions),), device=weight.device)
    torch.nn.functional.cross_entropy(logits, targets).backward()


def floor_row(
    model, shapes: list, sample: int, warmup: int, lm_params: int, bf16: bool, audio: bool = False
) -> dict[str, Any]:
    """Time ``sample`` micro-batches of the epoch (after ``warmup`` ones that compile); the epoch's estimate. With
    ``bf16`` under autocast, as the Trainer runs (PEFT keeps LoRA weights in float32; autocast multiplies in bf16)."""
    vocab = model.config.vocab_size
    timed = _sample(shapes, sample)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for shape in timed[:: max(1, len(timed) // warmup)][:warmup]:
            _step(model, shape, vocab, audio)
        sync()
        free_memory()
        start = time.perf_counter()
        for shape in timed:
            _step(model, shape, vocab, audio)
        sync()
    per_batch = (time.perf_counter() - start) / len(timed)
    tokens = sum(row[0] for _, _, rows in shapes for row in rows)
    epoch_s = per_batch * len(shapes)
    return {
        "epoch_s": epoch_s,
        "s_per_micro_batch": per_batch,
        "micro_batches": len(shapes),
        "tokens_per_sample": tokens / sum(b for b, _, _ in shapes),
        "padding_share": 1 - tokens / sum(b * w for b, w, _ in shapes),
        "tflops": 4 * lm_params * tokens / epoch_s / 1e12,
        "peak_gib": peak_gib(),
    }


def run_floor(spec: dict, rows: list, base: list[str], after: list[str]) -> list[dict[str, Any]]:
    """The rows of ``conf/bench/floor.yaml``: the frozen LM, then each LoRA on it (fresh, the config's r, alpha,
    dropout and targets), on the micro-batches of the epoch of ``spec['train']`` + the row's ``extra`` overrides;
    ``audio`` rows also train the audio encoder and projector (Unfreeze). Compiled on a GPU."""
    from peft import LoraConfig, cast_mixed_precision_params, get_peft_model

    from phi4_pron.adapters import AUDIO_MODULES
    from phi4_pron.bench.measure import command
    from phi4_pron.fast.layers import compile_layers, compile_settings
    from phi4_pron.jobs.train import model_path
    from phi4_pron.modeling import load_base_model

    cfg = compose("train", [*base, *spec["train"], *after])
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg.hardware.bf16 else torch.float32
    path = model_path(cfg.model)
    revision = None if Path(path).is_dir() else cfg.model.revision
    model = load_base_model(path, revision, dtype, "sdpa").to("cuda" if gpu else "cpu")
    model.requires_grad_(False).train()
    lm_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "audio" not in n)
    lm_params += model.get_output_embeddings().weight.numel()
    if gpu:
        compile_layers(model)  # as training compiles them
    shapes: dict[tuple, list] = {}
    out = []
    for i, row in rows:
        lora_override = [f"lora={row['lora']}"] if "lora" in row else []
        overrides = [*base, *spec["train"], *lora_override, *row.get("extra", []), *after]
        row_cfg = compose("train", overrides)
        key = (row_cfg.hardware.per_device_train_batch_size, row_cfg.optim.effective_batch_size)
        if key not in shapes:
            shapes[key] = epoch_shapes(row_cfg)
        audio = bool(row.get("audio"))
        for n, p in model.named_parameters():
            p.requires_grad_(audio and any(m in n for m in AUDIO_MODULES))
        if audio:
            cast_mixed_precision_params(model, dtype)  # as training: float32 master weights for the trained encoder
        net = model
        if "lora" in row:
            lora = row_cfg.lora
            peft_cfg = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=row.get("dropout", lora.dropout),
                target_modules=lora.target_modules,
            )
            net = get_peft_model(model, peft_cfg).train()
        torch._dynamo.reset()  # each row compiles its own layers
        with compile_settings(row_cfg.hardware):  # as training compiles
            result = floor_row(net, shapes[key], spec["sample"], spec["warmup"], lm_params, cfg.hardware.bf16, audio)
        if net is not model:
            net.unload()  # the LoRA layers out again: the next row starts from the frozen LM
        model.zero_grad(set_to_none=True)
        out.append({**row, **result, "row": i, "command": "floor of: " + command("train", overrides)})
        print(out[-1], flush=True)
    del model
    free_memory()
    return [r if math.isfinite(r["epoch_s"]) else {**r, "epoch_s": None} for r in out]
