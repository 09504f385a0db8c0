"""GPU memory of training's audio-embedding pass (``audio_cache.compute_audio_table``) over the training split,
batches in order of duration, shortest first or longest first, each order in its own process (a clean allocator).

    python scripts/audio_pass_memory.py --model=DIR --data=DIR --order=shortest|longest <train overrides>

Prints one JSON line: peak GiB allocated and reserved (the caching allocator's pool, what the benchmarks report).
"""

import builtins
import json
import sys
import time

import torch
from audio_pass_ab import training_split  # this folder's

from phi4_pron import audio_cache


def main(argv: list[str]) -> None:
    cfg, flags, model, collator, split = training_split(argv)
    longest_first = flags["order"] == "longest"
    # compute_audio_table orders its batches with sorted(); this fixes the direction whatever the code's own
    audio_cache.sorted = lambda items, key, reverse=False: builtins.sorted(items, key=key, reverse=longest_first)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved() / 2**30
    start = time.perf_counter()
    _, _, table = audio_cache.cache_audio_embeddings(
        model, split, collator, cfg.hardware.per_device_eval_batch_size, cfg.hardware.dataloader_num_workers
    )
    torch.cuda.synchronize()
    row = {
        "order": flags["order"],
        "seconds": round(time.perf_counter() - start, 2),
        "reserved_before_gib": round(before, 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1),
        "batch": cfg.hardware.per_device_eval_batch_size,
        "table_rows": table.shape[0],
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
