"""Where a generation batch's time goes, and what a static cache with compiled (CUDA-graph) decoding changes.

    OUT=experiments/benchmarks python experiments/benchmarks/explore_decode.py VARIANT   # appends explore_decode.jsonl

VARIANT: dynamic | inductor | cudagraphs | inductor-repeat-kv; PROFILE=1 also writes profile-decode-*.txt.

GPU only: the full-size random-weight model, r64 LoRA merged, as ``bench eval``; batches of 256 length-sorted
synthetic test rows that answer at their reference length (``bench.ReferenceAnswerLength``). Each row is one
``generate`` call: the prefill alone (1 new token), the whole batch, with the dynamic cache (the framework's
evaluation before this) or with ``cache_implementation="static"`` (the batch's prompt + 128 tokens rounded up to 64),
which makes ``generate`` compile the decoding step: Inductor with CUDA graphs (transformers' default
``CompileConfig``, reduce-overhead) or the ``cudagraphs`` backend (CUDA graphs of the eager kernels, no Inductor),
with the packed-heads decoding attention (``inference.DECODE_ATTENTION``) or, ``inductor-repeat-kv``, plain sdpa.
The first static call compiles; later ones show what a new prompt length costs. The first rows of
``explore_decode.jsonl`` (variant missing) are this script's first version: one ``max_cache_len`` of 512, plain sdpa.
"""

import functools
import json
import os
import sys
import time

import torch
from transformers import CompileConfig, Phi4MultimodalFeatureExtractor, StoppingCriteriaList

from phi4_pron import bench
from phi4_pron.inference import generate_from_batch, generation_collator

OUT = os.environ.get("OUT", ".")
BATCH = 256
tok = bench.bench_tokenizer(False)
fe = Phi4MultimodalFeatureExtractor()
model = bench.eval_model(tok, False, "sdpa")
rows = sorted(bench.synthetic_rows(2500, seed=2), key=lambda r: len(r["text"]))
collate = generation_collator(tok, fe)
generate = model.generate


def profiled(what: str, start: int, new_tokens: int, **kw) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        run(what, start, new_tokens=new_tokens, **kw)
    events = p.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    table = events.table(sort_by="self_cuda_time_total", row_limit=30)
    name = what.replace(" ", "-")
    open(f"{OUT}/profile-decode-{name}.txt", "w").write(f"GPU busy {busy:.0f} ms\n" + table)
    print(what, f"GPU busy {busy:.0f} ms", flush=True)


def run(what: str, start: int, new_tokens: int = 128, bucket: int = 0, **kw) -> None:
    part = rows[start : start + BATCH]
    batch = collate(part)
    if bucket:
        kw["max_cache_len"] = -(-(batch["input_ids"].shape[1] + new_tokens) // bucket) * bucket
    stop = StoppingCriteriaList([bench.ReferenceAnswerLength(tok, part)])
    model.generate = functools.partial(generate, stopping_criteria=stop, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    answers = generate_from_batch(model, tok, batch, new_tokens)
    torch.cuda.synchronize()
    r = {
        "what": what,
        "variant": VARIANT,
        "first_row": start,
        "batch": len(part),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "max_new_tokens": new_tokens,
        "steps": min(new_tokens, int(stop[0].lengths.max())),
        "s": round(time.perf_counter() - t0, 3),
        "peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1),
        **{k: v for k, v in kw.items() if k != "compile_config"},
        "compile_backend": kw["compile_config"].backend if "compile_config" in kw else None,
        **bench.versions(),
    }
    assert len(answers) == len(part)
    print(json.dumps(r), flush=True)
    with open(f"{OUT}/explore_decode.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


VARIANT = sys.argv[1] if len(sys.argv) > 1 else "dynamic"
if VARIANT in ("dynamic", "inductor-repeat-kv"):
    model.set_attn_implementation("sdpa")  # transformers' own (eagerly the same as DECODE_ATTENTION)
BUCKET = 64  # static cache length: the batch's prompt + 128 new tokens, rounded up to this


if VARIANT == "dynamic":
    run("dynamic warm-up", 1024)
    for start in (0, 1024, 2244):
        run("dynamic prefill only", start, new_tokens=1)
        run("dynamic", start)
    if os.environ.get("PROFILE"):
        profiled("dynamic profiled 32 tokens", 1024, 32)
        profiled("dynamic profiled prefill", 1024, 1)
else:
    extra = {"cache_implementation": "static", "bucket": BUCKET}
    if VARIANT == "cudagraphs":
        extra["compile_config"] = CompileConfig(backend="cudagraphs", mode=None)
    for i, start in enumerate((1024, 1024, 0, 2244, 0, 2244)):
        run(f"{VARIANT} {'compile' if i == 0 else 'static'}", start, **extra)
    if os.environ.get("PROFILE"):
        profiled(f"{VARIANT} profiled 32 tokens", 1024, 32, **extra)
