"""One generation batch at a time (no retries), to see what a batch size costs or why it fails.

    OUT=experiments/benchmarks python experiments/benchmarks/explore_eval.py 512 256   # appends explore_eval.jsonl

GPU only: the full-size random-weight model, LoRA merged, as ``bench eval``; each batch of the length-sorted
synthetic test rows answers at its reference length (``bench.ReferenceAnswerLength``). ``evaluation.generate_records``
retries a failed batch row by row, which hides an out-of-memory batch as a very slow evaluation; this does not.
"""

import functools
import json
import os
import sys
import time

import torch
from transformers import Phi4MultimodalFeatureExtractor, StoppingCriteriaList

from phi4_pron import bench
from phi4_pron.inference import generate_from_batch, generation_collator

OUT = os.environ.get("OUT", ".")
tok = bench.bench_tokenizer(False)
fe = Phi4MultimodalFeatureExtractor()
model = bench.eval_model(tok, False, "sdpa")
rows = sorted(bench.synthetic_rows(2500, seed=2), key=lambda r: len(r["text"]))
collate = generation_collator(tok, fe)
generate = model.generate
for size in [int(a) for a in sys.argv[1:]] or [512, 256]:
    for start in (0, 1024, 2500 - size):  # short, middle and long texts
        batch = collate(rows[start : start + size])
        stop = StoppingCriteriaList([bench.ReferenceAnswerLength(tok, rows[start : start + size])])
        model.generate = functools.partial(generate, stopping_criteria=stop)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            answers = generate_from_batch(model, tok, batch, 128)
            torch.cuda.synchronize()
            error = None
        except Exception as e:  # noqa: BLE001
            answers, error = [], repr(e)[:300]
        r = {
            "batch": size,
            "first_row": start,
            "s": time.perf_counter() - t0,
            "tokens": int(batch["input_ids"].shape[1]),
            "new_tokens": max((len(tok(a)["input_ids"]) for a in answers), default=0),
            "peak_gib": torch.cuda.max_memory_reserved() / 2**30,
            "error": error,
            **bench.versions(),
        }
        print(json.dumps(r), flush=True)
        with open(f"{OUT}/explore_eval.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
