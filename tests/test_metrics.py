"""phi4_pron.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from phi4_pron.metrics import detected_mispronunciations, mdd_scores, pcc, per, wer


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
