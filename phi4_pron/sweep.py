"""Sweep bookkeeping: W&B grouping, and a summary + Table 3 kept current after every job."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from phi4_pron.results import write_json_atomic

log = logging.getLogger(__name__)


def wandb_identity(run_name: str) -> tuple[str, str | None]:
    """(run name, group): a sweep's jobs share one group named after the sweep folder."""
    if not HydraConfig.initialized():
        return run_name, None
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        return Path(hc.runtime.output_dir).name, f"sweep-{sweep.parent.name}-{sweep.name}"
    return run_name, None


class SweepSummary(Callback):
    """After each job of a multirun: record its status in ``sweep_summary.json`` and refresh ``table3.md``.

    Written after every job (not only at the end), so a failing job neither hides the others' results
    nor leaves the summary unwritten when Hydra re-raises the failure once the sweep is over.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from hydra.core.utils import JobStatus

        from phi4_pron.table3 import write_table3

        sweep_dir = Path(config.hydra.sweep.dir)
        summary_file = sweep_dir / "sweep_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"jobs": []}
        failed = job_return.status == JobStatus.FAILED
        entry = {
            "num": config.hydra.job.num,
            "overrides": list(config.hydra.overrides.task),
            "run_dir": str(Path(config.hydra.runtime.output_dir)),
            "status": "failed" if failed else "completed",
            "error": f"{type(job_return._return_value).__name__}: {job_return._return_value}" if failed else None,
        }
        summary["jobs"] = [j for j in summary["jobs"] if j["num"] != entry["num"]] + [entry]
        summary["failed"] = [j["num"] for j in summary["jobs"] if j["status"] == "failed"]
        write_json_atomic(summary_file, summary)
        write_table3(sweep_dir)
        if failed:
            log.error(
                "sweep job #%d (%s) failed: %s -- the other jobs go on; see %s",
                entry["num"],
                " ".join(entry["overrides"]),
                entry["error"],
                summary_file,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (sweep_dir / "table3.md").exists():
            print(f"\nTable 3 for {sweep_dir}:\n" + (sweep_dir / "table3.md").read_text())
