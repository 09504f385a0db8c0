"""A run folder's bookkeeping: one job at a time (a lock), which checkpoint a job resumes from, and whether the
folder's run was trained with the same settings.

    checkpoint-epoch-N/     adapter + optimizer/scheduler/RNG state after epoch N (resumable), stamped with the run id
    final_model/            adapter, tokenizer, feature extractor, task.json
    eval/checkpoint-*/      predictions, metrics, plots
    logs/                   TensorBoard events
    training_config.json    what was trained, how, and how many parameters; the run id
    .hydra/                 the composed config (written once the job's checks have passed)
    previous-<time>/        an older run's files, moved aside when this one started over

A folder holds one run: a job resumes only checkpoints its run wrote, with that run's settings, and a job that starts
over moves the old run's files aside first, so no file of two runs is ever read as one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi4_pron import dist
from phi4_pron.results import SET_ASIDE

log = logging.getLogger(__name__)

RUN_RECORD = "training_config.json"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json")
RUN_STAMP = "run_id"  # in every checkpoint: the run that wrote it
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
PRUNED = "optimizer_state_removed"  # in a checkpoint whose optimizer state was removed (keep_optimizer_states)
# what a run leaves in its folder (moved aside together when another run starts over in it)
RUN_FILES = ("checkpoint-*", "final_model", "eval", "logs", RUN_RECORD, "table3.*", ".hydra", "README.md")

# Settings that do not change the trained model: a run may resume with other values of these.
RESUME_SAFE = (
    "logger",
    "eval",
    "resume",
    "experiment_description",
    "hardware.dataloader_num_workers",
    "hardware.per_device_eval_batch_size",
    "hardware.compile_cpp_wrapper",  # how the compiled kernels are launched (runs from before it lack the key)
    "hardware.audio_layers_kept",  # which activations are recomputed: the same gradients (runs before it lack the key)
    "keep_optimizer_states",  # what older checkpoints keep on disk
)


class RunFolderError(RuntimeError):
    """The run folder holds another run, or another job is using it; the message says what to do."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def recorded_run(run_dir: str | Path) -> dict | None:
    """The run folder's ``training_config.json``, or None; an unreadable one is named."""
    file = Path(run_dir) / RUN_RECORD
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(
            f"{file} cannot be read ({e}): the run it describes is unknown. Move the folder aside, or start over in "
            "it (resume=false: its files are moved to previous-<time>/)."
        ) from None


def latest_checkpoint(run_dir: str | Path, run_id: str | None = None) -> Path | None:
    """The newest whole checkpoint in a run folder (by training step), or None. Only ``checkpoint-epoch-N`` folders
    count (the Trainer's ``checkpoint-<step>`` becomes one only once it is whole), only those whose files are all
    there and whole (:func:`checkpoint_problem`), and with ``run_id`` only those that run wrote; any other is skipped
    with a warning naming why, and the previous one used."""
    best, best_step = None, -1
    for d in Path(run_dir).glob("checkpoint-epoch-*"):
        if problem := checkpoint_problem(d, run_id):
            log.warning("%s is not resumable (%s): skipped", d, problem)
            continue
        step = json.loads((d / "trainer_state.json").read_text()).get("global_step", -1)
        if step > best_step:
            best, best_step = d, step
    return best


def checkpoint_problem(ckpt: Path, run_id: str | None = None) -> str | None:
    """Why a checkpoint cannot be resumed (a file missing, cut short or unreadable; written by another run), or None."""
    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).exists()]
    if missing:
        return f"lacks {missing}"
    if (ckpt / PRUNED).exists():
        return "its optimizer state was removed (keep_optimizer_states): evaluable, not resumable"
    for f in sorted(ckpt.glob("*.safetensors")):
        if problem := _safetensors_problem(f):
            return f"{f.name}: {problem}"
    for f in ("trainer_state.json", "adapter_config.json"):
        try:
            json.loads((ckpt / f).read_text())
        except (OSError, ValueError) as e:
            return f"{f}: {e}"
    for f in ("optimizer.pt", "scheduler.pt"):
        if (ckpt / f).exists() and (ckpt / f).stat().st_size == 0:
            return f"{f} is empty"
    stamp = (ckpt / RUN_STAMP).read_text().strip() if (ckpt / RUN_STAMP).exists() else None
    if run_id is not None and stamp != run_id:
        return f"written by run {stamp or '(unknown)'}, not this folder's run {run_id}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file's header read and its size checked against it (a file cut short by a kill or a full disk)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                return f"cut short ({size} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"header unreadable ({e})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end <= size else f"cut short ({size} of {8 + n + end} bytes)"


def prune_optimizer_states(run_dir: Path, keep: int) -> list[Path]:
    """Remove the optimizer state of every checkpoint but the ``keep`` newest (``-1``: none removed); each keeps its
    adapter, trainer state and a note (:data:`PRUNED`). Returns the checkpoints pruned now."""
    if keep < 0:
        return []
    ckpts = sorted(run_dir.glob("checkpoint-epoch-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    pruned = []
    for ckpt in ckpts[: max(0, len(ckpts) - keep)]:
        files = [ckpt / f for f in OPTIMIZER_FILES if (ckpt / f).exists()]
        if files:
            (ckpt / PRUNED).write_text(f"removed {[f.name for f in files]}: keep_optimizer_states={keep}\n")
            for f in files:
                f.unlink()
            pruned.append(ckpt)
    return pruned


def stamped_run_id(run_dir: Path) -> str:
    """The id of the run a resumed job continues (its record's); a run recorded without one gets one now, and its
    checkpoints that lack a stamp get it (they passed the settings check as this run's)."""
    run_id = (recorded_run(run_dir) or {}).get("run_id")
    if run_id is None:
        run_id = new_run_id()
        if dist.is_main_process():
            for ckpt in run_dir.glob("checkpoint-epoch-*"):
                if not (ckpt / RUN_STAMP).exists():
                    (ckpt / RUN_STAMP).write_text(run_id + "\n")
    return run_id


def set_aside(run_dir: Path) -> Path | None:
    """Move what an earlier run left in ``run_dir`` into ``run_dir/previous-<time>/`` (nothing is deleted); returns it,
    or None where there was nothing."""
    found = sorted({p for pattern in RUN_FILES for p in run_dir.glob(pattern)})
    if not found or not dist.is_main_process():
        return None
    dest = run_dir / f"{SET_ASIDE}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{SET_ASIDE}{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    log.warning("%s held an earlier run: its files are now in %s", run_dir, dest)
    return dest


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs (``key: saved -> current``), RESUME_SAFE ones left out."""
    if prefix.rstrip(".") in RESUME_SAFE:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            c
            for k in sorted(set(saved) | set(current), key=str)
            for c in config_changes(saved.get(k), current.get(k), f"{prefix}{k}.")
        ]
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint this job continues from, or None where it starts over. ``resume=auto`` continues from the newest
    whole checkpoint of the folder's run if it has one, ``true`` requires one, ``false`` starts over, ``force``
    continues even where the folder's run was trained with other settings (else refused, naming them). A job that
    starts over in a used folder moves the old run's files aside first (:func:`set_aside`)."""
    mode = str(cfg.resume).lower()
    if mode in ("false", "no", "0"):
        set_aside(run_dir)
        return None
    record = recorded_run(run_dir)
    ckpt = latest_checkpoint(run_dir, record.get("run_id") if record else None)
    if ckpt is None and mode in ("true", "yes", "1", "force"):
        raise FileNotFoundError(
            f"resume={mode} but {run_dir} has no complete checkpoint-epoch-N folder to resume from (one its run wrote, "
            "every file whole)."
        )
    if mode != "force" and record is not None:  # the folder's run: its checkpoints, final_model/ and eval/ alike
        settings = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # a composed config may carry it
        changes = config_changes(record["config"], OmegaConf.to_container(settings, resolve=True))
        if changes:
            raise RunFolderError(
                f"{run_dir} holds a run trained with other settings ({len(changes)}: {'; '.join(changes[:8])}). "
                "Going on would mix that run's files with this one's. Give this run its own folder "
                "(hydra.run.dir=output/<name>), start over in this one (resume=false: the old run's files are moved "
                "to previous-<time>/), or continue it anyway (resume=force)."
            )
    if ckpt is None:
        set_aside(run_dir)  # a run with nothing to resume (killed before its first checkpoint, or finished and pruned)
        return None
    log.info("resuming from %s", ckpt)
    return str(ckpt)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path):
    """An exclusive lock on the run folder for the whole job (rank 0 holds it): a second job fails at once, naming
    the holder, instead of mixing its checkpoints with this one's."""
    if not dist.is_main_process():
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")  # noqa: SIM115 - closed below
    except OSError as e:
        raise RunFolderError(
            f"cannot write the run folder {run_dir} ({e.strerror}): choose a writable output_root=... or "
            "hydra.run.dir=..."
        ) from None
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunFolderError(
                f"{run_dir} is in use by another job ({f.read().strip() or 'holder unknown'}): wait for it to end, "
                "or give this run another folder (hydra.run.dir=...)."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
