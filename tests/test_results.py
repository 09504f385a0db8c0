"""phi4_pron.results: files and folders land whole, or not at all."""

from __future__ import annotations

import pytest


def test_a_folder_another_process_landed_first_is_kept(tmp_path):
    """Two processes building one folder (torchrun ranks and the tiny checkpoint): the second to finish keeps the
    first one's folder, raises nothing and leaves no temporary folder behind."""
    from phi4_pron.results import atomic_folder

    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "mine").write_text("2")
        out.mkdir()
        (out / "theirs").write_text("1")  # the other process lands while this one is still writing
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_replaced_folder_is_whole_or_untouched(tmp_path):
    """final_model/ is written so: a full disk half way leaves the old folder, whole, and names the folder."""
    import errno

    from phi4_pron.results import replaced_folder

    out = tmp_path / "final_model"
    with replaced_folder(out) as d:
        (d / "a").write_text("old")
    with pytest.raises(OSError, match=f"cannot write {out} \\(No space left on device\\)"):
        with replaced_folder(out) as d:
            (d / "a").write_text("new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
    with replaced_folder(out) as d:
        (d / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
