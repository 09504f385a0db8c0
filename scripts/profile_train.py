"""Where a training command's steps spend their time: ``python -m phi4_pron.train <overrides>`` run in this process
with torch's profiler over optimizer steps 4-5 (after the compile), its tables printed (GPU time, then CPU time).

    python scripts/profile_train.py <train overrides ...>      # e.g. the Unfreeze row's command from train.md
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from phi4_pron.bench.measure import compose
from phi4_pron.training import run_training


class Profile(TrainerCallback):
    def __init__(self, first: int = 3, steps: int = 2):
        self.first, self.last, self.prof = first, first + steps, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif state.global_step == self.last and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            print(table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
            print(table.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=70))


callback = Profile()
cfg = compose("train", [*sys.argv[1:], f"optim.max_steps={callback.last}"])
run_training(cfg, run_dir=Path(tempfile.mkdtemp()) / "run", callbacks=[callback])
