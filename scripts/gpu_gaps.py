"""Where the GPU waits: the idle gaps between kernels in a torch profiler's Chrome trace, each charged to the host
operations that launched the kernel after it (outermost and innermost), and whether a host-device synchronisation
ended just before it. Used by ``profile_train.py --gaps``.

    python scripts/gpu_gaps.py trace.json [--min-us=5]
"""

from __future__ import annotations

import bisect
import collections
import json
import sys

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _enclosing(ops: list[dict], starts: list[float], t: float, depth: int = 4000) -> list[dict]:
    """The operations of one thread (sorted by start) that are running at time ``t``, outermost first."""
    i = bisect.bisect_right(starts, t)
    found = [e for e in ops[max(0, i - depth) : i] if e["ts"] + e.get("dur", 0) >= t]
    return sorted(found, key=lambda e: e["ts"])


def idle_gaps(trace: dict, min_us: float = 5.0, rows: int = 20) -> str:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU events in the trace"
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    host: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            host[(e["pid"], e["tid"])].append(e)
    for ops in host.values():
        ops.sort(key=lambda e: e["ts"])
    starts = {k: [e["ts"] for e in ops] for k, ops in host.items()}
    sync_ends = sorted(
        e["ts"] + e["dur"] for e in events if e.get("cat") == "cuda_runtime" and e["name"].startswith(SYNCS)
    )

    idle, after_sync, busy = collections.Counter(), collections.Counter(), 0.0
    count = collections.Counter()
    end = gpu[0]["ts"]
    for k in gpu:
        gap = k["ts"] - end
        busy += k["dur"]
        if gap >= min_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            key = "(no launch found)"
            if launch is not None:
                tid = (launch["pid"], launch["tid"])
                ops = _enclosing(host.get(tid, []), starts.get(tid, []), launch["ts"])
                key = " > ".join(dict.fromkeys(o["name"][:60] for o in (ops[:1] + ops[-1:]))) or "(no host op)"
            idle[key] += gap
            count[key] += 1
            j = bisect.bisect_right(sync_ends, k["ts"]) - 1
            if j >= 0 and sync_ends[j] >= end - 1.0:  # a synchronisation returned during the gap
                after_sync[key] += gap
        end = max(end, k["ts"] + k["dur"])
    span = end - gpu[0]["ts"]
    total = sum(idle.values())
    lines = [
        f"GPU span {span / 1e6:.3f} s: kernels {busy / 1e6:.3f} s, idle gaps of {min_us:g} us or more "
        f"{total / 1e6:.3f} s ({total / span:.1%}), of them after a synchronisation returned "
        f"{sum(after_sync.values()) / 1e6:.3f} s. By the host ops launching the kernel after the gap "
        "(outermost > innermost):",
    ]
    lines += [
        f"{t / 1e3:9.1f} ms {count[key]:6d} gaps {after_sync[key] / 1e3:9.1f} ms after a sync  {key}"
        for key, t in idle.most_common(rows)
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    min_us = next((float(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--min-us=")), 5.0)
    for path in paths:
        with open(path) as f:
            print(idle_gaps(json.load(f), min_us))
