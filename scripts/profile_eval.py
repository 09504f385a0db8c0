"""Evaluation's generation, A/B in one process on one loaded model (so every variant runs on the same machine).

Stages, each written to $OUT/profile_eval.json as it ends (a call stopped at its limit keeps what it measured):

- ``attention``: :func:`phi4_pron.inference.flash_prompt_attention` against SDPA under the padding mask on random
  left-padded prompts (largest difference on real positions, time of each at APA's batch shape);
- ``numerics``: one APA batch's last-position logits with the prompt blocks compiled and without, both against the
  same model in float32 (:func:`phi4_pron.inference.compile_prompt_blocks` changes where bf16 rounds);
- variants over the split's first ``--limit`` recordings (``generate_records``, as ``evaluate`` calls it), after a
  first run that compiles; answers compared with the first variant's. ``--variants`` picks them, in order:
  ``before`` (prompts attend to the whole static cache, no prompt blocks, memory-efficient attention), ``crop``
  (their own positions), ``blocks`` (and the prompt blocks compiled), ``flash`` (and flash attention: the code as
  ``evaluate`` runs it on a GPU), ``synced`` (flash, with decoding steps as before 2026-12-01: ``generate`` waiting
  for the GPU at every step and passing the audio to every step, without ``inference.stop_check_one_step_late`` and
  ``inference.audio_read_at_prefill_only``), ``codec`` (flash, every recording decoded by torchcodec, as before
  2026-12-02: no direct read of 16 kHz PCM WAVs, and a new static cache every call), ``fresh`` (flash, a new static
  cache every call: no ``inference.static_cache_reused``), ``ownaudio`` (flash, every prompt reading its own audio:
  no ``audio_cache.shared_audio_table``), ``headmajor`` (flash, the prompts' rotary embedding computed in Phi-4's
  head-major views, every size dynamic), ``sdpadecode`` (flash, decoding steps' attention by the packed SDPA over the
  whole cache: no ``inference.flash_decode_attention``), ``symbolicwidth`` (flash, the prompts' rotary embedding with
  every size a symbol: no ``modeling.mark_sizes_static``, as before 2026-12-03's third session), ``prior`` (all
  three, as before 2026-12-02's second session). ``--compile-each``: a first run for every variant (their compiled
  decoding steps differ).
  ``--decoding``: one APA batch's decoding steps, timed and profiled (after the first and the last variant).
  ``--breakdown``: one more run of the last with every ``generate()`` call timed (each token synchronised).
  ``--timeline``: one more run of the last, unsynchronised, with CUDA events at each ``generate()`` call's entry, its
  prefill's start and end, and its exit: per call, the host's time before it and the GPU's idle time before its
  prefill, the prefill's and the decoding's GPU time; and the CUDA graph recordings and eager warm-ups it caused.

    python scripts/profile_eval.py --model=DIR --data=DIR [--limit=N] [--variants=blocks,flash] [--compile-each] \
        [--decoding] [--breakdown] [--timeline] <evaluate overrides>

The base model stands for the trained one: a merged adapter has its structure, and weights do not change the speed.
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from phi4_pron import data, inference, predictions
from phi4_pron.answer import questions_from_config
from phi4_pron.bench.measure import GenerateTimes, compose, sync
from phi4_pron.data import load_split
from phi4_pron.inference import DECODE_ATTENTION, generate_from_batch, generation_collator, static_cache_len
from phi4_pron.modeling import load_base_model, load_tokenizer_and_features
from phi4_pron.predictions import generate_records


def breakdown(calls: list[dict]) -> dict:
    apa = [c for c in calls if c["cache"] == max(c["cache"] for c in calls)]
    mdd = [c for c in calls if c not in apa]
    out = {}
    for name, group in (("apa", apa), ("mdd", mdd)):
        out[f"{name}_prefill_s"] = sum(c["prefill_s"] for c in group)
        out[f"{name}_decode_s"] = sum(c["decode_s"] for c in group)
        out[f"{name}_ms_per_step"] = 1000 * out[f"{name}_decode_s"] / max(1, sum(c["steps"] - 1 for c in group))
        out[f"{name}_wait_s"] = sum(c["wait_s"] for c in group)  # before each call: loading, the loader, scoring
    out["first_wait_s"] = calls[0]["wait_s"] if calls else 0.0
    return out


class Timeline:
    """While active, CUDA events (no synchronisation) at every ``generate()`` call's entry, prefill start and end,
    and exit, and a count of CUDA graph recordings and eager warm-ups (torch's cudagraph trees); :meth:`summary`
    after a sync."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, torch.cuda.Event]] = []
        self.graphs = {"record_function": [0, 0.0], "run_eager": [0, 0.0]}

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((name, time.perf_counter(), event))

    def __enter__(self) -> "Timeline":
        from torch._inductor import cudagraph_trees
        from transformers import GenerationMixin

        self._saved = [(GenerationMixin, n, getattr(GenerationMixin, n)) for n in ("generate", "_prefill")]
        self._saved += [
            (predictions, "with_lengths", predictions.with_lengths),
            (predictions, "shared_audio_table", predictions.shared_audio_table),
            (DataLoader, "__iter__", DataLoader.__iter__),
        ]
        manager = cudagraph_trees.CUDAGraphTreeManager
        self._saved += [(manager, n, getattr(manager, n)) for n in self.graphs]
        for owner, name, original in self._saved:
            setattr(owner, name, self._wrap(name, original))
        self.mark("start")
        return self

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if name in self.graphs:  # host time of a recording / warm-up (they run the step's kernels once)
                start = time.perf_counter()
                out = original(*args, **kwargs)
                self.graphs[name][0] += 1
                self.graphs[name][1] += time.perf_counter() - start
                return out
            self.mark(f"{name}:enter")
            out = original(*args, **kwargs)
            self.mark(f"{name}:exit")
            return out

        return wrapped

    def __exit__(self, *exc) -> None:
        self.mark("end")
        for owner, name, original in self._saved:
            setattr(owner, name, original)

    def summary(self) -> dict:
        sync()
        names = [m[0] for m in self.marks]
        calls = []
        for i, name in enumerate(names):
            if name != "generate:enter":
                continue
            enter, pre, pre_end, exit_ = (self.marks[i + j] for j in range(4))
            assert [pre[0], pre_end[0], exit_[0]] == ["_prefill:enter", "_prefill:exit", "generate:exit"], names
            before = next(m for m in reversed(self.marks[:i]) if m[0] in ("generate:exit", "start"))
            calls.append(
                {
                    "host_before_s": enter[1] - before[1],
                    "host_setup_s": pre[1] - enter[1],
                    "gpu_idle_before_prefill_s": before[2].elapsed_time(pre[2]) / 1e3,
                    "prefill_gpu_s": pre[2].elapsed_time(pre_end[2]) / 1e3,
                    "prefill_host_s": pre_end[1] - pre[1],
                    "decode_gpu_s": pre_end[2].elapsed_time(exit_[2]) / 1e3,
                }
            )
        wall = self.marks[-1][1] - self.marks[0][1]
        totals = {k: sum(c[k] for c in calls) for k in calls[0]} if calls else {}
        return {
            "wall_s": wall,
            "calls": len(calls),
            **{f"sum_{k}": v for k, v in totals.items()},
            "first_host_before_s": calls[0]["host_before_s"] if calls else None,
            # before the first call: from each mark to the next (lengths from the headers, the loader's start, ...)
            "before_first_call": [
                (f"{a[0]} -> {b[0]}", round(b[1] - a[1], 4))
                for a, b in zip(self.marks, self.marks[1 : names.index("generate:enter") + 1], strict=False)
            ],
            "after_last_s": self.marks[-1][1] - self.marks[-2][1],
            "cudagraph_recordings": self.graphs["record_function"][0],
            "cudagraph_recording_host_s": self.graphs["record_function"][1],
            "cudagraph_warmups": self.graphs["run_eager"][0],
            "cudagraph_warmup_host_s": self.graphs["run_eager"][1],
            "per_call": [{k: round(v, 4) for k, v in c.items()} for c in calls],
        }


def profile_batch(model, tokenizer, batch, cache_len, label, tokens: int = 1):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        generate_from_batch(model, tokenizer, batch, [tokens] * len(batch["input_ids"]), cache_len)
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) / 1e6
    print(f"\n## {label}: one APA prompt batch, {tokens} token(s) each, {total:.3f} s ({key})")
    print(events.table(sort_by=key, row_limit=20, max_name_column_width=70), flush=True)
    if tokens > 1 and torch.cuda.is_available():  # decoding steps: where the host's time goes
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70), flush=True)


def profile_decoding(model, tokenizer, batch, cache_len, label, steps: int = 8):
    """One APA batch answered with ``steps`` more tokens than its prompt's first: the decoding steps' share, timed
    unsynchronised (as evaluation runs) and in torch's profiler."""
    times = {}
    for n in (1, 1 + steps, 1, 1 + steps):  # the second pair is timed
        sync()
        start = time.perf_counter()
        generate_from_batch(model, tokenizer, batch, [n] * len(batch["input_ids"]), cache_len)
        sync()
        times[n] = time.perf_counter() - start
    ms_per_step = 1000 * (times[1 + steps] - times[1]) / steps
    print(f"\n## {label}: {ms_per_step:.2f} ms a decoding step", flush=True)
    profile_batch(model, tokenizer, batch, cache_len, label, tokens=1 + steps)
    return {"label": f"{label}: decoding", "ms_per_step": ms_per_step}


def main(argv: list[str]) -> None:
    cfg = compose("evaluate", [a for a in argv if not a.startswith("--")])
    flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv if a.startswith("--"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_base_model(flags["model"], None, dtype, "sdpa").to(device).eval()
    model.set_attn_implementation(DECODE_ATTENTION)
    tokenizer, features = load_tokenizer_and_features(flags["model"])
    questions = questions_from_config(cfg.task)
    dataset = load_split(flags["data"], "test", limit=int(flags["limit"]) if "limit" in flags else None)
    kwargs = dict(
        batch_size=cfg.hardware.per_device_eval_batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
        num_workers=cfg.hardware.dataloader_num_workers,
        compiled=True,
        progress=False,
    )
    apa = generation_collator(tokenizer, features, questions)(
        [{**dataset[i], "question": "apa"} for i in range(min(kwargs["batch_size"], len(dataset)))]
    )
    apa_cache = static_cache_len(apa["input_ids"].shape[1] + 8, questions["apa"].max_new_tokens)
    out = Path(os.environ.get("OUT", "output/bench-results"))
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    reference: list = []

    def run(label: str) -> None:
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        records = generate_records(model, tokenizer, features, questions, dataset, **kwargs)
        sync()
        row = {"label": label, "recordings": len(dataset), "wall_s": round(time.perf_counter() - start, 2)}
        if device == "cuda":  # the model's weights included
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        raw = [r["raw"] for r in records]
        if reference:
            row["same_answers"] = sum(
                a == b for r, s in zip(raw, reference, strict=True) for a, b in zip(r.values(), s.values(), strict=True)
            )
            row["answers"] = 2 * len(raw)
        else:
            reference.extend(raw)
        row["failed"] = sum(r["error"] is not None for r in records)
        results.append(row)
        print(json.dumps(row), flush=True)

    def save():
        (out / "profile_eval.json").write_text(json.dumps({"argv": argv, "results": results}, indent=1))

    if "attention" in flags.get("stages", "attention,numerics"):
        results.append(check_attention(device))
        print(json.dumps(results[-1]), flush=True)
        save()
    if "numerics" in flags.get("stages", "attention,numerics"):
        results.append(check_numerics(model, apa))
        print(json.dumps(results[-1]), flush=True)
        save()

    uncropped, flash = inference.prompt_positions, inference.flash_prompt_attention
    deferred, audio_once = inference.stop_check_one_step_late, inference.audio_read_at_prefill_only
    wav_samples, reused = data._wav_samples, inference.static_cache_reused
    shared_audio, flash_decode = predictions.shared_audio_table, inference.flash_decode_attention
    eager_rotary, landed_rotary = inference._eager_rotary, inference._compiled_rotary
    mark_static = inference.mark_sizes_static
    # a code object of its own, so that Dynamo's cache of the landed graph (static widths) does not serve it
    symbolic_rotary = torch.compile(lambda q, k, cos, sin, dim: eager_rotary(q, k, cos, sin, dim), dynamic=True)
    compiled_rotary = torch.compile(eager_rotary, dynamic=True)

    def head_major(q, k, cos, sin, unsqueeze_dim=1):  # as before 2026-12-02's second session
        rotary = compiled_rotary if inference.is_prompt(q, seq_dim=2) else eager_rotary
        return rotary(q, k, cos, sin, unsqueeze_dim)

    variants = flags.get("variants", "blocks,flash").split(",")
    blocks = False
    for k, name in enumerate(variants):
        flash_decoding = name in ("flash", "headmajor", "symbolicwidth")
        shared = flash_decoding or name == "sdpadecode"  # this session's variants: the table shared
        predictions.shared_audio_table = shared_audio if shared else lambda *args: None
        inference.flash_decode_attention = flash_decode if flash_decoding else inference.packed_decode_attention
        symbolic = name == "symbolicwidth"
        inference.mark_sizes_static = (lambda *tensors: None) if symbolic else mark_static
        inference._compiled_rotary = symbolic_rotary if symbolic else landed_rotary
        inference.prompt_positions = (
            uncropped if name != "before" else lambda query, key, value, mask: (key, value, mask)
        )
        inference.flash_prompt_attention = flash if name not in ("before", "crop", "blocks") else efficient_attention
        landed = name not in ("before", "crop", "blocks", "synced")
        inference.stop_check_one_step_late = deferred if landed else contextlib.nullcontext
        inference.audio_read_at_prefill_only = audio_once if landed else contextlib.nullcontext
        data._wav_samples = wav_samples if name != "codec" else lambda audio: None
        inference.static_cache_reused = reused if landed and name not in ("codec", "fresh") else contextlib.nullcontext
        first = k == 0 or "compile-each" in flags
        if name not in ("before", "crop") and not blocks:
            print("compiled prompt blocks:", inference.compile_prompt_blocks(model), flush=True)
            blocks = first = True
        if blocks:
            rotary = head_major if name in ("prior", "headmajor") else inference._prompt_rotary
            inference.phi4_modeling.apply_rotary_pos_emb = rotary
        if first:
            run(f"{name}: first run (compiles)")
        run(name)
        save()
        if k in (0, len(variants) - 1):
            profile_batch(model, tokenizer, apa, apa_cache, name)
            if "decoding" in flags:
                results.append(profile_decoding(model, tokenizer, apa, apa_cache, name))
                save()
    if "breakdown" in flags:
        with GenerateTimes() as times:
            run(f"{variants[-1]}, every token synchronised")
        results[-1].update(breakdown(times.calls))
        print(json.dumps({k: round(v, 3) for k, v in breakdown(times.calls).items()}), flush=True)
        save()
    if "timeline" in flags:  # a GPU (CUDA events)
        with Timeline() as timeline:
            run(f"{variants[-1]}, timeline")
        results[-1]["timeline"] = timeline.summary()
        print(json.dumps({k: v for k, v in results[-1]["timeline"].items() if k != "per_call"}), flush=True)
        save()


def efficient_attention(module, query, key, value, mask, scaling=None):
    """What SDPA runs for a padded prompt batch (its memory-efficient kernel)."""
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)


def ms_per_call(fn, *args, warmup: int, repeat: int, **kwargs) -> float:
    """Milliseconds ``fn(*args, **kwargs)`` takes on the GPU, averaged over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args, **kwargs)
    sync()
    return 1000 * (time.perf_counter() - start) / repeat


def check_attention(device: str) -> dict:
    """flash_prompt_attention against SDPA under the mask: random left-padded prompts, APA's batch shape."""
    if device != "cuda":
        return {"label": "attention", "skipped": "no GPU"}
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    batch, width = 256, 576
    q = torch.randn(batch, 24, width, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, width, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.randint(width // 2, width + 1, (batch,), device=device)
    lengths[0] = width
    pos = torch.arange(width, device=device)
    real = pos[None] >= (width - lengths)[:, None]  # left padding
    mask = (pos[None, :, None] >= pos[None, None, :]) & real[:, None, :]
    mask = mask[:, None]
    ref, _ = efficient_attention(module, q, k, v, mask, scaling=128**-0.5)
    out, _ = inference.flash_prompt_attention(module, q, k, v, mask, scaling=128**-0.5)
    diff = (out - ref).abs()[real].max().item()
    times = {
        f"{name}_ms": round(ms_per_call(fn, module, q, k, v, mask, scaling=128**-0.5, warmup=2, repeat=10), 3)
        for name, fn in (("efficient", efficient_attention), ("flash", inference.flash_prompt_attention))
    }
    finite = bool(torch.isfinite(out).all())
    return {
        "label": "attention",
        "shape": [batch, 24, width, 128],
        "max_abs_diff_real": diff,
        "finite": finite,
        **times,
        "decoding": check_decode_attention(device),
    }


def check_decode_attention(device: str, batch: int = 256, length: int = 704) -> dict:
    """flash_decode_attention against the packed SDPA for one decoding step over a static cache of APA's length:
    rows left-padded (up to 200 positions), the cache's tail empty (the current position 600)."""
    torch.manual_seed(0)
    q = torch.randn(batch, 24, 1, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, length, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(length, device=device)
    first = torch.randint(0, 200, (batch,), device=device)
    mask = ((pos[None] >= first[:, None]) & (pos[None] <= 600))[:, None, None]
    outs, times = {}, {}
    for name, fn in (("packed_sdpa", inference.packed_decode_attention), ("flash", inference.flash_decode_attention)):
        outs[name] = fn(None, q, k, v, mask, scaling=128**-0.5)[0]
        times[f"{name}_ms"] = round(ms_per_call(fn, None, q, k, v, mask, scaling=128**-0.5, warmup=3, repeat=20), 4)
    diff = (outs["flash"] - outs["packed_sdpa"]).abs().max().item()
    return {"shape": [batch, 24, length, 128], "max_abs_diff": diff, **times}


@torch.inference_mode()
def check_numerics(model, batch) -> dict:
    """Last-position logits of one APA batch: bf16 eager, bf16 with the prompt blocks, float32 (the reference)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}

    def logits():
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()

    eager = logits()
    own = {id(m) for m in model.modules() if "forward" in m.__dict__}
    inference.compile_prompt_blocks(model)
    blocks = logits()
    for m in model.modules():  # undo compile_prompt_blocks: the classes' forward again
        if "forward" in m.__dict__ and id(m) not in own:
            del m.forward
    inference.phi4_modeling.apply_rotary_pos_emb = inference._eager_rotary
    model.float()
    exact = logits()
    model.to(torch.bfloat16)
    scale = exact.std().item()
    row = {"label": "numerics", "logit_std_fp32": scale}
    for name, x in (("eager_bf16", eager), ("blocks_bf16", blocks)):
        row[f"{name}_max_abs_diff_over_std"] = (x - exact).abs().max().item() / scale
        row[f"{name}_mean_abs_diff_over_std"] = (x - exact).abs().mean().item() / scale
        row[f"{name}_top1_same_as_fp32"] = (x.argmax(-1) == exact.argmax(-1)).float().mean().item()
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
