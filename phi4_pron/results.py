"""Result files (and built folders) are written atomically: a reader never sees half of one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SET_ASIDE = "previous-"  # an older run's files, moved aside when a new run starts over in its folder


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_line(obj: Any) -> str:
    """One strict-JSON line (NaN as null) of a ``.jsonl`` file."""
    return json.dumps(_finite(obj), allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    """NaN/inf become null, so the file is strict JSON (jq, JavaScript) and still says 'undefined'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Strict JSON (NaN written as null), atomically."""
    return write_text_atomic(path, json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) and move it into place whole; if another process finished the
    same folder first, theirs is kept. A failure leaves nothing behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, out_dir)  # fails if another process's folder is there (not empty): keep theirs
        except OSError:
            if not out_dir.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def replaced_folder(out_dir: str | Path) -> Iterator[Path]:
    """Build a folder in a hidden temporary sibling (yielded), then put it in the place of ``out_dir``: at every
    moment ``out_dir`` is the old folder or the new one, whole. A failure leaves the old one and nothing else; a
    failure to write names ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = out_dir.with_name(f".{out_dir.name}.old")
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"cannot write {out_dir} ({e.strerror or e}); nothing of it was changed") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
