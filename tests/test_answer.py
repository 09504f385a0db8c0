"""The prompt/answer format: targets built from corpus rows, and tolerant parsing."""

from __future__ import annotations

import json

from conftest import task_questions

from phi4_pron.answer import join_parsed, pronounced_phones

ROW = {
    "text": "PETER IS GOOD",
    "accuracy": 9.0,
    "fluency": 7.0,
    "prosodic": 5.0,
    "total": 8.0,
    "words": [
        {"text": "PETER", "phones": ["P", "IY1", "T", "ER0"], "mispronunciations": []},
        {
            "text": "IS",
            "phones": "IH0 Z",
            "mispronunciations": [{"canonical-phone": "Z", "index": 1, "pronounced-phone": "<DEL>"}],
        },
        {
            "text": "GOOD",
            "phones": ["G", "UH0", "D"],
            "mispronunciations": [{"canonical-phone": "UH0", "index": 1, "pronounced-phone": "CH"}],
        },
    ],
}


JOINT = task_questions("joint")["joint"]
PAPER = task_questions("paper")


def test_joint_target_answer():
    answer = json.loads(JOINT.target(ROW))
    assert answer == {
        "accuracy": 9,
        "fluency": 7,
        "prosodic": 5,
        "total": 8,
        "transcript": "PETER IS GOOD",
        "phones": "P IY T ER IH G CH D",
        "mispronunciations": [["IS", "Z", "<DEL>"], ["GOOD", "UH", "CH"]],
    }
    assert pronounced_phones(ROW["words"]) == ["P", "IY", "T", "ER", "IH", "G", "CH", "D"]


def test_paper_targets_are_the_papers_two_answers():
    assert json.loads(PAPER["apa"].target(ROW)) == {"accuracy": 9, "fluency": 7, "prosodic": 5, "total": 8}
    assert json.loads(PAPER["mdd"].target(ROW)) == {
        "word_transcript": "PETER IS GOOD",
        "phoneme_transcript": "P IY T ER IH G CH D",
    }


def test_paper_prompts_hold_no_sentence_and_start_with_their_control_text():
    for name, control in (("apa", "<|APA|>"), ("mdd", "<|MDD|>")):
        before, after = PAPER[name].prompt("PETER IS GOOD")
        assert before == "<|user|>" + control
        assert not any(user for _, user in after) and "PETER" not in "".join(t for t, _ in after)
        assert "".join(t for t, _ in after).endswith("<|end|><|assistant|>")
    assert "Rate the pronunciation of the audio." in PAPER["apa"].instruction
    assert "Transcribe the audio utterance" in PAPER["mdd"].instruction
    assert len(PAPER["apa"].instruction.split()) > 250  # a rubric about as long as the paper's


def test_joint_prompt_marks_the_sentence_as_user_text():
    before, after = JOINT.prompt("  WE CALL IT BEAR ")
    assert before == "<|user|>"
    assert ("WE CALL IT BEAR", True) in after and after[-1] == ("<|end|><|assistant|>", False)


def test_parse_round_trip_and_join():
    apa, mdd = PAPER["apa"].parse(PAPER["apa"].target(ROW)), PAPER["mdd"].parse(PAPER["mdd"].target(ROW))
    assert join_parsed({"apa": apa, "mdd": mdd}) == {
        "accuracy": 9.0,
        "fluency": 7.0,
        "prosodic": 5.0,
        "total": 8.0,
        "transcript": "PETER IS GOOD",
        "phones": "P IY T ER IH G CH D",
    }
    assert join_parsed({"apa": None, "mdd": mdd}) == {"transcript": "PETER IS GOOD", "phones": "P IY T ER IH G CH D"}
    assert join_parsed({"apa": None, "mdd": None}) is None
    assert JOINT.parse(JOINT.target(ROW))["phones"] == "P IY T ER IH G CH D"


def test_parse_reads_single_quotes_as_the_papers_examples():
    assert PAPER["mdd"].parse("{'word_transcript': 'WE CALL IT BEAR', 'phoneme_transcript': 'W IY K AO L'}") == {
        "transcript": "WE CALL IT BEAR",
        "phones": "W IY K AO L",
    }
    assert PAPER["apa"].parse("{'accuracy': 8, 'fluency': 7, 'prosodic': 6, 'total': 7}")["prosodic"] == 6.0


def test_parse_is_tolerant():
    apa = PAPER["apa"]
    assert apa.parse('Sure! {"accuracy": 7, "fluency": "8", "total": 12,} thanks') == {
        "accuracy": 7.0,
        "fluency": 8.0,
        "total": 10.0,
    }
    assert JOINT.parse('{"accuracy": 7, "transcript": "WE CALL') is None  # unterminated string
    assert apa.parse('{"accuracy": 7, "fluency": 6') == {"accuracy": 7.0, "fluency": 6.0}  # cut at max tokens
    assert apa.parse("no json here") is None
    assert apa.parse('{"accuracy": "high"}') == {}
    assert apa.parse('{"accuracy": NaN, "fluency": 5}') == {"fluency": 5.0}  # NaN is no score
    assert apa.parse("[1, 2]") is None
    assert PAPER["mdd"].parse('{"accuracy": 7}') == {}  # another question's keys are not this one's


def test_a_boolean_is_not_a_score():
    assert PAPER["apa"].parse('{"accuracy": 7, "total": true, "fluency": false}') == {"accuracy": 7.0}
