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

from phi4_pron.bench.measure import GenerateTimes, compose
from phi4_pron.evaluation import run_evaluation

out = Path(os.environ.get("OUT", "output/bench-results"))
row = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-1]
cfg = compose("evaluate", row["command"].split()[3:])
summary = {}
for run in ("cold", "warm") if "--warm" in sys.argv else ():  # untimed by call: the compile, then a warm run
    start = time.perf_counter()
    run_evaluation(cfg)
    summary[f"{run}_wall_s"] = time.perf_counter() - start
    print(summary, flush=True)
start = time.perf_counter()
with GenerateTimes() as times:
    run_evaluation(cfg)
calls = times.calls
summary.update(wall_s=time.perf_counter() - start, generate_calls=len(calls))
for key in ("wait_s", "prefill_s", "decode_s"):
    summary[key] = sum(c[key] for c in calls)
per_step = sorted(c["decode_s"] / (c["steps"] - 1) for c in calls if c["steps"] > 1)
summary["decode_ms_per_step_median"] = 1000 * per_step[len(per_step) // 2] if per_step else None
print(json.dumps(summary, indent=1))
(out / "eval_breakdown.json").write_text(json.dumps({"command": row["command"], "summary": summary, "calls": calls}))
