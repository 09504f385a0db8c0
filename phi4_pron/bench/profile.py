"""Where a command's time goes, on the command itself (run in this process, as :mod:`phi4_pron.bench.measure` runs it):

    python -m phi4_pron.bench.profile train [--what=ops|roots|gaps|syncs|sample|time] [--steps=N] <train overrides>
    python -m phi4_pron.bench.profile eval <evaluate overrides>

``train`` profiles optimizer steps 4 to 3+N (after the compiling ones): ``ops`` torch's profiler tables (GPU time,
then CPU time), ``roots`` GPU time by the outermost operation that launched it, ``gaps`` the GPU's idle gaps by the host
ops that launched the kernel after each, ``syncs`` every host-device synchronisation by the lines that asked for it,
``sample`` the main thread's Python stack every 2 ms, ``time`` only wall and CPU seconds. ``eval`` times every
``generate()`` call of an evaluation: the wait before it, its prefill and its decoding (each token synchronised, which
makes decoding look slower than it is).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from phi4_pron.bench.measure import GenerateTimes, compose, sync
from phi4_pron.bench.traces import StackSampler, by_root, idle_gaps

FIRST = 3  # steps 1-3 compile


class Profile(TrainerCallback):
    """torch's profiler over steps ``first+1`` to ``first+steps``; prints its tables, or ``roots`` / ``gaps``."""

    def __init__(self, steps: int, what: str = "ops"):
        self.first, self.last, self.what, self.prof, self.start = FIRST, FIRST + steps, what, None, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if state.global_step == self.first:
            sync()
            self.prof = torch.profiler.profile(activities=activities, with_stack=self.what == "roots")
            self.prof.__enter__()
            self.start = time.perf_counter()
        elif state.global_step == self.last and self.prof is not None:
            sync()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            print(f"\n{self.last - self.first} steps profiled: wall {wall:.3f} s")
            if self.what == "roots":
                print(by_root(self.prof))
            elif self.what == "gaps":
                with tempfile.TemporaryDirectory() as tmp:
                    self.prof.export_chrome_trace(f"{tmp}/trace.json")
                    print(idle_gaps(json.loads(Path(f"{tmp}/trace.json").read_text())))
            else:
                table = self.prof.key_averages()
                sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                print(table.table(sort_by=sort, row_limit=30, max_name_column_width=70))
                print(table.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70))


class Sample(TrainerCallback):
    """A :class:`StackSampler` from the end of step ``first`` to the end of step ``first + steps`` (``interval``
    None: wall and CPU seconds only)."""

    def __init__(self, steps: int, interval: float | None = 0.002):
        self.first, self.last, self.sampler = FIRST, FIRST + steps, StackSampler(interval)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            sync()
            self.sampler.start()
        elif state.global_step == self.last:
            sync()
            self.sampler.report(f"{self.last - self.first} steps")


class Syncs(TrainerCallback):
    """Counts the synchronisations of steps ``first+1`` to ``first+steps`` by the innermost lines outside torch."""

    def __init__(self, steps: int):
        self.first, self.last, self.counts, self.show = FIRST, FIRST + steps, collections.Counter(), None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self.show(message, category, filename, lineno, file, line)
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if not ("/torch/" in f.filename or f.filename.endswith("warnings.py"))
        ]
        self.counts[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])] += 1

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            sync()
            warnings.simplefilter("always")
            self.show, warnings.showwarning = warnings.showwarning, self._record
            torch.cuda.set_sync_debug_mode("warn")
        elif state.global_step == self.last and self.show is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self.show
            print(f"{sum(self.counts.values())} synchronisations in {self.last - self.first} steps, by caller:")
            for where, count in self.counts.most_common(30):
                print(f"{count:6d}  {where}")


def profile_train(overrides: list[str], what: str = "ops", steps: int = 2) -> TrainerCallback:
    """Train ``FIRST + steps`` optimizer steps of ``python -m phi4_pron.train <overrides>`` with the profiler."""
    from phi4_pron.jobs.train import run_training

    callback = {
        "syncs": lambda: Syncs(steps),
        "sample": lambda: Sample(steps),
        "time": lambda: Sample(steps, interval=None),
    }.get(what, lambda: Profile(steps, what))()
    cfg = compose("train", [*overrides, f"optim.max_steps={callback.last}"])
    with tempfile.TemporaryDirectory() as tmp:
        run_training(cfg, run_dir=Path(tmp) / "run", callbacks=[callback])
    return callback


def profile_eval(overrides: list[str]) -> dict:
    """Run ``python -m phi4_pron.evaluate <overrides>`` with every ``generate()`` call timed; a summary."""
    from phi4_pron.jobs.evaluate import run_evaluation

    cfg = compose("evaluate", overrides)
    start = time.perf_counter()
    with GenerateTimes() as times:
        run_evaluation(cfg)
    calls = times.calls
    summary = {"wall_s": time.perf_counter() - start, "generate_calls": len(calls)}
    for key in ("wait_s", "prefill_s", "decode_s"):
        summary[key] = sum(c[key] for c in calls)
    per_step = sorted(c["decode_s"] / (c["steps"] - 1) for c in calls if c["steps"] > 1)
    summary["decode_ms_per_step_median"] = 1000 * per_step[len(per_step) // 2] if per_step else None
    return {"summary": summary, "calls": calls}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "eval"])
    p.add_argument("--what", choices=["ops", "roots", "gaps", "syncs", "sample", "time"], default="ops")
    p.add_argument("--steps", type=int, default=2, help="train: the optimizer steps profiled after the first 3")
    a, overrides = p.parse_known_args(argv)
    if a.command == "train":
        profile_train(overrides, a.what, a.steps)
    else:
        print(json.dumps(profile_eval(overrides)["summary"], indent=1))


if __name__ == "__main__":
    main()
