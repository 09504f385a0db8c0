"""Process rank under torchrun / accelerate launch (one process per GPU); a plain run is rank 0 of 1."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (a no-op when there is only one)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
