"""``python -m phi4_pron.bench floor`` with the main thread's stack sampled over each row's timed micro-batches
(stack_sampler.py): the floor's host time next to a training run's (``profile_train.py --sample``).

    python scripts/sample_floor.py --only 5 [--out DIR]     # the Unfreeze floor row
"""

import runpy
import sys

from stack_sampler import StackSampler

from phi4_pron.bench import floor

row = floor.floor_row
free_memory = floor.free_memory
sampler: list[StackSampler] = []


def free_then_sample() -> None:  # floor_row frees memory between its compiling and its timed micro-batches
    free_memory()
    sampler.append(StackSampler())
    sampler[-1].start()


def sampled_row(*args, **kwargs):
    out = row(*args, **kwargs)
    sampler[-1].report(f"floor row, {out['micro_batches']} micro-batches in the epoch, timed ones sampled")
    return out


floor.free_memory, floor.floor_row = free_then_sample, sampled_row
sys.argv = ["phi4_pron.bench", "floor", *sys.argv[1:]]
runpy.run_module("phi4_pron.bench", run_name="__main__")
