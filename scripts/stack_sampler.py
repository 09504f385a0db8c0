"""A sampler of the main thread's Python stack (every 2 ms, no per-op overhead): where a CPU-bound loop spends its
host time. Used by profile_train.py and sample_floor.py (scripts/ is their import path)."""

import collections
import resource
import sys
import threading
import time
from pathlib import Path


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
