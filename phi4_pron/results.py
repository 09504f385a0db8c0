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

from phi4_pron.answer import SCORE_KEYS

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


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``predictions.jsonl``, each checked: a line that is not JSON, lacks its answer or reference,
    repeats an utterance or holds a human score that is not a number in 0-10 is named."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON line ({e}).") from e
    if not records:
        raise ValueError(f"{path} holds no predictions: give a predictions.jsonl written by phi4_pron.evaluate.")
    missing = [n for n, r in enumerate(records, 1) if "raw" not in r or "reference" not in r]
    if missing:
        raise ValueError(
            f"{path}: lines {missing[:5]} lack 'raw' or 'reference'; give a predictions.jsonl "
            "written by phi4_pron.evaluate."
        )
    problems = _record_problems(records)
    if problems:
        raise ValueError(f"{path}: {len(problems)} problems, none scored: " + "; ".join(problems[:10]) + ".")
    return records


def _record_problems(records: list[dict[str, Any]]) -> list[str]:
    """Duplicated utterance ids (each would be scored twice) and human scores that are not numbers in 0-10."""
    lines: dict[Any, list[int]] = {}
    for n, r in enumerate(records, 1):
        lines.setdefault(r.get("id"), []).append(n)
    problems = [f"utterance {u} is on lines {ns}" for u, ns in lines.items() if len(ns) > 1]
    for n, r in enumerate(records, 1):
        for k in SCORE_KEYS:
            v = r["reference"].get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:  # NaN fails the range
                problems.append(f"line {n} (utterance {r.get('id')}): reference {k}={v!r} is not a score in 0-10")
    return problems
