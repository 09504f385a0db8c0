"""Reading where time goes: a sampler of the main thread's Python stack, and two readings of a torch profiler's
trace (the GPU's idle gaps charged to the host ops that launched the kernel after each; GPU time by the outermost
operation that launched it). Used by :mod:`phi4_pron.bench.profile`."""

from __future__ import annotations

import bisect
import collections
import re
import resource
import sys
import threading
import time
from pathlib import Path

from torch.autograd import DeviceType

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


def _where(frame) -> list[str]:
    out = []
    while frame is not None:
        out.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
        frame = frame.f_back
    return out


class StackSampler:
    """``start()``, then ``report(label)``: wall and process CPU seconds between them, and (``interval``) the share of
    samples each function was in (inclusive) and each innermost line."""

    def __init__(self, interval: float | None = 0.002):
        self.interval = interval
        self.stacks: list[tuple[list[str], str]] = []
        self.stop = threading.Event()

    def _run(self) -> None:
        main = threading.main_thread().ident
        while not self.stop.is_set():
            frame = sys._current_frames().get(main)
            if frame is not None:
                self.stacks.append((_where(frame), f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"))
            time.sleep(self.interval)

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        if self.interval:
            threading.Thread(target=self._run, daemon=True).start()

    def report(self, label: str) -> None:
        self.stop.set()
        wall = time.perf_counter() - self.wall
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - self.cpu.ru_utime - self.cpu.ru_stime
        n = len(self.stacks)
        print(f"\n{label}: {wall:.1f} s wall, {cpu:.1f} s CPU of this process (all threads), {n} samples")
        if not n:
            return
        inclusive = collections.Counter(f for stack, _ in self.stacks for f in set(stack))
        print("inclusive share of samples (function in the stack):")
        for f, c in inclusive.most_common(60):
            print(f"  {c / n:6.1%}  {f}")
        print("innermost Python line:")
        for f, c in collections.Counter(line for _, line in self.stacks).most_common(40):
            print(f"  {c / n:6.1%}  {f}")


def _is_python(evt) -> bool:
    """A Python frame or module call that ``with_stack`` records as an event of its own."""
    return bool(re.match(r"^\S+\(\d+\): ", evt.name)) or evt.name.startswith(("<built-in", "nn.Module: ", "<string>"))


def by_root(prof, rows: int = 25) -> str:
    """GPU time summed by the outermost operation (not a Python frame) whose subtree launched it; an eager op's name
    with the innermost frame of this project or of transformers/PEFT/TRL/accelerate that called it."""
    gpu = collections.Counter()
    for evt in prof.events():
        if evt.device_type != DeviceType.CPU or not evt.self_device_time_total:
            continue  # kernels are counted through the host op that launched them
        root, up = evt, evt.cpu_parent
        while up is not None:
            root = root if _is_python(up) else up
            up = up.cpu_parent
        name, up = root.name, root.cpu_parent
        if "Compiled" not in name and "#" not in name:
            packages = ("phi4_pron", "transformers/", "peft/", "trl/", "accelerate/")
            while up is not None and not any(k in up.name for k in packages):
                up = up.cpu_parent
            name += f" @ {up.name.split('site-packages/')[-1]}" if up is not None else ""
        gpu[name] += evt.self_device_time_total
    total = sum(gpu.values()) or 1
    lines = [f"GPU time by outermost op: {total / 1e6:.3f} s in all"]
    lines += [f"{t / 1e3:10.1f} ms {t / total:6.1%}  {name}" for name, t in gpu.most_common(rows)]
    return "\n".join(lines)
