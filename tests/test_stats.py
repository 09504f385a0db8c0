"""phi4_pron.stats: every metric recomputed from per-recording quantities as ``score`` computes it, its bootstrap
interval, and the paired test of a difference, against known cases and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from phi4_pron.predictions import score
from phi4_pron.stats import METRICS, intervals, metric_values, paired_difference, point_values, recordings

PHONES = "W IY K AO L IH T"


def _records(human, predicted, transcripts=None, phones=None, ids=None):
    """Records of the paper's task: human and predicted (accuracy, fluency, prosodic, total); None: unparseable."""
    out = []
    for i, (h, p) in enumerate(zip(human, predicted, strict=True)):
        parsed = None
        if p is not None:
            parsed = dict(zip(("accuracy", "fluency", "prosodic", "total"), map(float, p), strict=True))
            parsed["transcript"] = transcripts[i] if transcripts else "WE CALL IT"
            parsed["phones"] = phones[i] if phones else PHONES
        out.append(
            {
                "id": ids[i] if ids else f"u{i}",
                "raw": "",
                "parsed": parsed,
                "error": None,
                "reference": {
                    **dict(zip(("accuracy", "fluency", "prosodic", "total"), map(float, h), strict=True)),
                    "text": "WE CALL IT",
                    "phones": PHONES,
                    "canonical": ["W", "IY1", "K", "AO1", "L", "IH1", "T"],
                    "mispronounced": [False, False, False, i % 2 == 0, False, False, False],
                },
            }
        )
    return out


def _noisy(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    human = rng.integers(0, 11, (n, 4))
    predicted = np.clip(human + rng.normal(0, noise, (n, 4)), 0, 10)
    return human, predicted


def test_each_metric_from_per_recording_counts_equals_scores():
    human, predicted = _noisy(40, 2.0)
    predicted = [None if i % 7 == 3 else p for i, p in enumerate(predicted)]  # some unparseable
    transcripts = ["WE CALL", "WE CALL IT", "WE FALL IT NOW", "", "CALL IT"] * 8
    phones = ["W IY K AA L IH T", PHONES, "W IY K L", "", "K AO L IH T T"] * 8
    records = _records(human, predicted, transcripts, phones)
    records[5]["error"] = "DataError: cannot decode"  # a failed recording counts in no metric
    expected = score(records)
    values = dict(zip(METRICS, metric_values(recordings(records), np.arange(len(records))), strict=True))
    for m in ("pcc_accuracy", "pcc_total", "wer", "per", "mdd_precision", "mdd_recall", "mdd_f1"):
        assert values[m] == pytest.approx(expected[m], abs=1e-9), m


def test_scc_mse_and_the_pcc_p_value_against_hand_computed_values():
    human = [(2, 2, 2, 2), (4, 4, 4, 4), (6, 6, 6, 6), (8, 8, 8, 8)]
    predicted = [(1, 1, 1, 1), (5, 5, 5, 5), (4, 4, 4, 4), (9, 9, 9, 9)]
    m = point_values(_records(human, predicted))
    assert m["mse_total"] == pytest.approx((1 + 1 + 4 + 1) / 4)
    assert m["scc_total"] == pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)))  # Spearman's formula, no ties
    r = scipy_stats.pearsonr([1, 5, 4, 9], [2, 4, 6, 8]).statistic
    t = r * math.sqrt(2 / (1 - r * r))
    assert m["pcc_total_p"] == pytest.approx(2 * scipy_stats.t.sf(abs(t), df=2))


def test_the_interval_of_a_perfect_correlation_is_degenerate():
    human = [(h, h, h, h) for h in range(11)] * 3
    ci = intervals(_records(human, human), resamples=200)
    assert ci["pcc_total_ci"] == pytest.approx([1.0, 1.0]) and ci["mse_total_ci"] == [0.0, 0.0]
    assert ci["wer_ci"] == [0.0, 0.0]


def test_intervals_shrink_as_recordings_grow_and_hold_their_estimate():
    widths = []
    for n in (50, 800):
        records = _records(*_noisy(n, 2.0, seed=n))
        m = score(records, resamples=500)
        lo, hi = m["pcc_total_ci"]
        assert lo < m["pcc_total"] < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # about 1/sqrt(16) as wide
    assert score(records, resamples=500)["pcc_total_ci"] == m["pcc_total_ci"]  # seeded
    assert "pcc_total_ci" not in score(records) and score(records)["bootstrap_resamples"] == 0


def test_a_large_difference_is_significant_and_noise_is_not():
    human, good = _noisy(300, 1.0, seed=1)
    rng = np.random.default_rng(2)
    bad = np.clip(human + rng.normal(0, 4.0, human.shape), 0, 10)
    good_again = np.clip(human + rng.normal(0, 1.0, human.shape), 0, 10)  # the same quality, other noise
    a, b, c = _records(human, bad), _records(human, good), _records(human, good_again)
    big = paired_difference(a, b, resamples=1000)
    assert big["n"] == 300 and big["pcc_total"]["difference"] > 0.3 and big["pcc_total"]["p"] < 0.01
    assert big["pcc_total"]["ci"][0] > 0 and big["mse_total"]["difference"] < 0 and big["mse_total"]["p"] < 0.01
    noise = paired_difference(b, c, resamples=1000)
    assert noise["pcc_total"]["p"] > 0.05 and noise["pcc_total"]["ci"][0] < 0 < noise["pcc_total"]["ci"][1]


def test_a_paired_test_compares_the_recordings_both_evaluated():
    human, p = _noisy(10, 1.0)
    a = _records(human, p)
    b = list(reversed(_records(human[:8], p[:8])))  # another order, two recordings fewer
    result = paired_difference(a, b, resamples=100)
    assert result["n"] == 8 and result["pcc_total"]["difference"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="share 0 recordings"):
        paired_difference(a, _records(human, p, ids=[f"x{i}" for i in range(10)]), resamples=100)
