"""Where an evaluation's time goes: the last row of ``bench eval`` (``$OUT/eval.jsonl``) run again with every
``generate()`` call timed: the wait before it (loading, the loader), its prefill (to the first token) and its
decoding steps. Each token is synchronised (a streamer), which makes decoding look slower than it is.

    python -m phi4_pron.bench eval --out $OUT && python scripts/eval_breakdown.py [--warm]  # $OUT/eval_breakdown.json

``--warm``: the evaluation runs twice before, untimed by call (the compile, then a warm run: both walls noted).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationMixin

from phi4_pron.bench.measure import compose
from phi4_pron.evaluation import run_evaluation

calls: list[dict] = []
last = [time.perf_counter()]
generate = GenerationMixin.generate


class Stamps:
    """A streamer that only notes when each token (the prompt first) is ready."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed_generate(self, *args, **kwargs):
    stamps = Stamps()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(self, *args, streamer=stamps, **kwargs)
    torch.cuda.synchronize()
    end = time.perf_counter()
    prefill = stamps.times[1] - start if len(stamps.times) > 1 else end - start
    ids = kwargs["input_ids"]
    steps = out.shape[1] - ids.shape[1]
    calls.append(
        {
            "wait_s": start - last[0],
            "prefill_s": prefill,
            "decode_s": end - start - prefill,
            "steps": steps,
            "width": ids.shape[1],
            "batch": ids.shape[0],
            "cache": kwargs.get("max_cache_len"),
        }
    )
    last[0] = end
    return out


out = Path(os.environ.get("OUT", "output/bench-results"))
row = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-1]
cfg = compose("evaluate", row["command"].split()[3:])
summary = {}
for run in ("cold", "warm") if "--warm" in sys.argv else ():  # untimed by call: the compile, then a warm run
    start = time.perf_counter()
    run_evaluation(cfg)
    summary[f"{run}_wall_s"] = time.perf_counter() - start
    print(summary, flush=True)
GenerationMixin.generate = timed_generate
last[0] = start = time.perf_counter()
run_evaluation(cfg)
summary.update(wall_s=time.perf_counter() - start, generate_calls=len(calls))
for key in ("wait_s", "prefill_s", "decode_s"):
    summary[key] = sum(c[key] for c in calls)
per_step = sorted(c["decode_s"] / (c["steps"] - 1) for c in calls if c["steps"] > 1)
summary["decode_ms_per_step_median"] = 1000 * per_step[len(per_step) // 2] if per_step else None
print(json.dumps(summary, indent=1))
(out / "eval_breakdown.json").write_text(json.dumps({"command": row["command"], "summary": summary, "calls": calls}))
