"""Metric functions against hand-computed values, and the Table 3 report of them."""

from __future__ import annotations

import json
import math

import pytest

from phi4_pron.metrics import detected_mispronunciations, mdd_scores, pcc, per, wer
from phi4_pron.predictions import score


def test_pcc_hand_computed():
    # x = 1,2,3 ; y = 1,3,2: cov = 0.5, var_x = var_y = 1 -> r = 0.5
    assert pcc([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pcc_undefined_is_nan_not_a_crash():
    assert math.isnan(pcc([5, 5, 5], [1, 2, 3]))  # constant predictions
    assert math.isnan(pcc([7], [3]))
    assert math.isnan(pcc([], []))


def test_wer_hand_computed():
    assert wer(["we call it bear"], ["WE CALL IT BEAR."]) == 0.0  # case and punctuation ignored
    assert wer(["WE CALL IT BEAR"], ["WE CALL IT BEER"]) == pytest.approx(1 / 4)  # one substitution
    assert wer(["WE CALL IT BEAR"], ["WE DO CALL IT BEAR"]) == pytest.approx(1 / 4)  # one insertion
    assert wer(["A B", "C D E F"], ["A", "C D E F"]) == pytest.approx(1 / 6)  # pooled over the corpus
    assert wer(["WE CALL"], [""]) == 1.0  # empty answer: all deletions


def test_per_ignores_stress():
    assert per([["K", "AE1", "T"]], ["K AE T"]) == 0.0
    assert per([["K", "AE1", "T"]], ["K AH T"]) == pytest.approx(1 / 3)
    assert per(["K AE T"], ["K AE T S"]) == pytest.approx(1 / 3)


def test_detection_alignment():
    assert detected_mispronunciations(["K", "AE1", "T"], "K AE T") == [False, False, False]
    assert detected_mispronunciations(["K", "AE1", "T"], "K AH T") == [False, True, False]  # substitution
    assert detected_mispronunciations(["K", "AE1", "T"], "K T") == [False, True, False]  # deletion
    assert detected_mispronunciations(["K", "AE1", "T"], "K AE T S") == [False, False, False]  # insertion only
    assert detected_mispronunciations(["K", "AE1", "T"], "") == [True, True, True]


def test_mdd_hand_computed():
    truth = [[False, True, False], [True, True]]
    predicted = [[False, True, True], [False, True]]
    # tp = 2, fp = 1, fn = 1 -> P = R = 2/3, F1 = 2/3
    s = mdd_scores(truth, predicted)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    everything = mdd_scores([[True, True]], [[True, True]])  # all mispronounced, all found
    assert everything["f1"] == 1.0
    none_found = mdd_scores([[True, False]], [[False, False]])
    assert none_found["f1"] == 0.0 and math.isnan(none_found["precision"])


def _record(raw_parsed, ref_scores, text="WE CALL IT", phones="W IY K AO L IH T", flags=None, error=None):
    canonical = ["W", "IY1", "K", "AO1", "L", "IH1", "T"]
    return {
        "id": "x",
        "raw": "",
        "parsed": raw_parsed,
        "error": error,
        "reference": {
            "accuracy": ref_scores[0],
            "fluency": ref_scores[1],
            "prosodic": ref_scores[2],
            "total": ref_scores[3],
            "text": text,
            "phones": phones,
            "canonical": canonical,
            "mispronounced": flags or [False] * 7,
        },
    }


def test_score_perfect_predictions():
    refs = [(8, 9, 7, 8), (5, 6, 4, 5), (9, 9, 9, 9)]
    flags = [False, False, False, True, False, False, False]
    records = [
        _record(
            {
                "accuracy": a,
                "fluency": f,
                "prosodic": p,
                "total": t,
                "transcript": "WE CALL IT",
                "phones": "W IY K AA L IH T",
            },
            (a, f, p, t),
            phones="W IY K AA L IH T",
            flags=flags,
        )
        for a, f, p, t in refs
    ]
    m = score(records)
    assert all(m[f"pcc_{k}"] == pytest.approx(1.0) for k in ("accuracy", "fluency", "prosodic", "total"))
    assert (m["wer"], m["per"], m["mdd_f1"]) == (0.0, 0.0, 1.0)
    assert (m["n_failed"], m["n_unparseable"]) == (0, 0)


def test_score_counts_failures_and_unparseable_answers():
    good = _record(
        {
            "accuracy": 8,
            "fluency": 8,
            "prosodic": 8,
            "total": 8,
            "transcript": "WE CALL IT",
            "phones": "W IY K AO L IH T",
        },
        (8, 8, 8, 8),
    )
    good2 = _record(
        {
            "accuracy": 3,
            "fluency": 3,
            "prosodic": 3,
            "total": 3,
            "transcript": "WE CALL IT",
            "phones": "W IY K AO L IH T",
        },
        (4, 4, 4, 4),
    )
    unparseable = _record(None, (5, 5, 5, 5))
    failed = _record(None, (5, 5, 5, 5), error="DataError: cannot decode")
    m = score([good, good2, unparseable, failed])
    assert (m["n_utterances"], m["n_failed"], m["n_unparseable"]) == (4, 1, 1)
    assert m["n_accuracy"] == 2 and m["pcc_accuracy"] == pytest.approx(1.0)  # left out of PCC
    assert m["wer"] == pytest.approx(3 / 9)  # the unparseable answer's 3 words are deletions
    assert m["per"] == pytest.approx(7 / 21)
    assert m["mdd_fp"] == 7  # its every canonical phone counts as detected


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
