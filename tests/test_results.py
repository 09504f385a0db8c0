"""phi4_pron.results: files and folders land whole, or not at all."""

from __future__ import annotations


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
