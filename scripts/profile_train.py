"""Where a training command's steps spend their time: ``python -m phi4_pron.train <overrides>`` run in this process
over optimizer steps 4-5 (after the compile) with torch's profiler (its tables printed: GPU time, then CPU time), or
over steps 4 to 3+N with ``--sample`` (the main thread's Python stack every 2 ms, stack_sampler.py: no per-op
overhead) or ``--time`` (only the wall and CPU seconds of those steps); ``--syncs``: every host-device
synchronisation of steps 4-5 (``torch.cuda.set_sync_debug_mode``), counted by the Python lines that asked for it.
``--roots``: the GPU time of those steps by the top-level operation that launched it (a compiled graph, an
optimizer step, an eager op with the innermost line of this project or transformers/PEFT/TRL that called it).
``--gaps``: the GPU's idle gaps in those steps, charged to the host ops that launched the kernel after each
(gpu_gaps.py). ``--skip-guards``: a trial, from step 4 on only the guards that tell the compiled graphs apart are
checked (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``).

    python scripts/profile_train.py [--sample|--time|--syncs|--roots|--gaps] [--steps=N] [--skip-guards] <overrides>
"""

import collections
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from gpu_gaps import idle_gaps
from stack_sampler import StackSampler
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from phi4_pron.bench.measure import compose, sync
from phi4_pron.training import run_training


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


class Profile(TrainerCallback):
    def __init__(self, first: int = 3, steps: int = 2, roots: bool = False, gaps: bool = False):
        self.first, self.last, self.prof, self.start = first, first + steps, None, 0.0
        self.roots, self.gaps = roots, gaps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=self.roots)
            self.prof.__enter__()
            self.start = time.perf_counter()
        elif state.global_step == self.last and self.prof is not None:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            n = self.last - self.first
            print(f"\n{n} steps profiled: wall {wall:.3f} s (GPU busy: the tables' Self CUDA total)")
            print(table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
            print(table.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70))
            if self.roots:
                print(by_root(self.prof))
            if self.gaps:
                with tempfile.TemporaryDirectory() as tmp:
                    self.prof.export_chrome_trace(f"{tmp}/trace.json")
                    with open(f"{tmp}/trace.json") as f:
                        print(idle_gaps(json.load(f)))


class Sample(TrainerCallback):
    """A :class:`StackSampler` from the end of step ``first`` to the end of step ``first + steps``."""

    def __init__(self, first: int = 3, steps: int = 5, interval: float | None = 0.002, skip_guards: bool = False):
        self.first, self.last, self.skip_guards = first, first + steps, skip_guards
        self.sampler = StackSampler(interval)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            if self.skip_guards:
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True).__enter__()
            sync()
            self.sampler.start()
        elif state.global_step == self.last:
            sync()
            self.sampler.report(f"{self.last - self.first} steps")


class Syncs(TrainerCallback):
    """Counts the synchronisations of steps ``first+1`` to ``first+steps`` by the innermost lines outside torch."""

    def __init__(self, first: int = 3, steps: int = 2):
        self.first, self.last, self.counts, self.show = first, first + steps, collections.Counter(), None

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
            torch.cuda.synchronize()
            warnings.simplefilter("always")
            self.show, warnings.showwarning = warnings.showwarning, self._record
            torch.cuda.set_sync_debug_mode("warn")
        elif state.global_step == self.last and self.show is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self.show
            n = self.last - self.first
            print(f"{sum(self.counts.values())} synchronisations in {n} steps, by caller (innermost first):")
            for where, count in self.counts.most_common(30):
                print(f"{count:6d}  {where}")


flags = {a for a in sys.argv[1:] if a.startswith("--")}
overrides = [a for a in sys.argv[1:] if not a.startswith("--")]
steps = next((int(f.split("=")[1]) for f in flags if f.startswith("--steps=")), 5)
roots, gaps = "--roots" in flags, "--gaps" in flags
callback = Syncs() if "--syncs" in flags else Profile(steps=steps if roots or gaps else 2, roots=roots, gaps=gaps)
if flags & {"--sample", "--time"}:
    interval = 0.002 if "--sample" in flags else None
    callback = Sample(steps=steps, interval=interval, skip_guards="--skip-guards" in flags)
cfg = compose("train", [*overrides, f"optim.max_steps={callback.last}"])
run_training(cfg, run_dir=Path(tempfile.mkdtemp()) / "run", callbacks=[callback])
