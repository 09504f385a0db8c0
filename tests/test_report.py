"""``python -m phi4_pron.report``: each evaluated checkpoint beside the paper's row."""

from __future__ import annotations

import json

import pytest


def test_report_puts_each_evaluated_checkpoint_next_to_the_papers_row(tmp_path, capsys):
    from phi4_pron.report import main

    with pytest.raises(SystemExit):  # nothing evaluated yet: say so, write no empty table
        main([str(tmp_path)])
    assert "no evaluated checkpoint" in capsys.readouterr().err and not (tmp_path / "table3.md").exists()
    out = tmp_path / "paper_r64" / "eval" / "checkpoint-epoch-3"
    out.mkdir(parents=True)
    metrics = {"epoch": 3, "task": "paper", "comparable_with_paper": True, "n_utterances": 2500, "pcc_total": 0.7}
    (out / "metrics.json").write_text(json.dumps(metrics))
    main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    ours = "| paper_r64 | checkpoint-epoch-3 | paper | LoRA | 3 | 2500 | 0 | n/a | n/a | n/a | 0.700"
    assert lines[2].startswith(ours)
    assert lines[3].startswith("| paper (Ahn & Nam) | | paper | LoRA | 3 | 2500 | | 0.656 | 0.727 | 0.711 | 0.675")
    assert (tmp_path / "table3.md").read_text().splitlines() == lines


def test_a_malformed_metrics_file_is_named_and_the_rest_reported(tmp_path, capsys):
    from phi4_pron.report import main

    for epoch, text in ((1, json.dumps({"epoch": 1, "pcc_total": 0.5})), (2, '{"epoch": 2, "pcc_')):
        out = tmp_path / "paper_r64" / "eval" / f"checkpoint-epoch-{epoch}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(text)
    aside = tmp_path / "paper_r64" / "previous-20261207-000000" / "eval" / "checkpoint-epoch-3"  # resume=false's
    aside.mkdir(parents=True)
    (aside / "metrics.json").write_text(json.dumps({"epoch": 3, "pcc_total": 0.9}))
    main([str(tmp_path)])
    captured = capsys.readouterr()
    assert "checkpoint-epoch-2/metrics.json" in captured.err and "left out" in captured.err
    assert [line.split(" | ")[1] for line in captured.out.splitlines()[2:] if line.startswith("| paper_r64")] == [
        "checkpoint-epoch-1"
    ]


def test_the_report_imports_no_torch():
    """report, its page and its statistics run where only the result files are (a laptop, no torch)."""
    import subprocess
    import sys

    code = "import sys, phi4_pron.report, phi4_pron.report_html; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
