"""What the CPU did while the GPU idled, from a Chrome trace written by ``bench train --profile``.

    python experiments/benchmarks/trace_gaps.py experiments/benchmarks/profile-explore-0.trace.json.gz

Busy = the union of GPU kernel and memcpy/memset intervals. Each idle gap ends when the next kernel's launch
reaches the GPU; the CPU time from the gap's start to that launch is split among the operators that ran on the
launching thread then, outermost first (a compiled region, an optimizer step, an aten op), and summed by name.
"""

import bisect
import gzip
import json
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def main(path: str, top: int = 25) -> None:
    events = [e for e in load(path) if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ops: dict[int, list[dict]] = defaultdict(list)  # per thread, by start time
    for e in sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"]):
        ops[e["tid"]].append(e)
    starts = {tid: [o["ts"] for o in lst] for tid, lst in ops.items()}
    longest = {tid: max(o["dur"] for o in lst) for tid, lst in ops.items()}
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy_until, idle, blame = gpu[0]["ts"], 0.0, defaultdict(float)
    for k in gpu:
        gap = k["ts"] - busy_until
        launch = launches.get(k["args"].get("correlation"))
        if gap > 5 and launch is not None:  # microseconds
            idle += gap
            lo, hi, tid = busy_until, min(launch["ts"], k["ts"]), launch["tid"]
            first = bisect.bisect_left(starts.get(tid, []), lo - longest.get(tid, 0))
            last = bisect.bisect_left(starts.get(tid, []), hi)
            inside = [o for o in ops[tid][first:last] if o["ts"] + o["dur"] > lo]
            outer = [o for o in inside if not any(p is not o and _contains(p, o) for p in inside)]
            covered = 0.0
            for o in outer:
                t = min(hi, o["ts"] + o["dur"]) - max(lo, o["ts"])
                blame[o["name"][:90]] += t
                covered += t
            blame["(no operator: Python, Trainer, data)"] += max(0.0, hi - lo - covered)
        elif gap > 5:
            idle += gap
            blame["(launch not in the trace)"] += gap
        busy_until = max(busy_until, k["ts"] + k["dur"])
    span = end - start
    print(f"{path}: span {span / 1e3:.1f} ms, GPU busy {(span - idle) / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms")
    for name, us in sorted(blame.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{us / 1e3:9.2f} ms  {name}")


def _contains(outer: dict, inner: dict) -> bool:
    return outer["ts"] <= inner["ts"] and outer["ts"] + outer["dur"] >= inner["ts"] + inner["dur"]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        main(arg)
