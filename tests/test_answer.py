"""The prompt/answer format: targets built from corpus rows, and tolerant parsing."""

from __future__ import annotations

import json

from phi4_pron.answer import parse_answer, prompt_text, pronounced_phones, target_answer

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


def test_target_answer():
    answer = json.loads(target_answer(ROW))
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


def test_prompt_has_one_audio_placeholder_and_ends_at_the_assistant_tag():
    p = prompt_text("  WE CALL IT BEAR ")
    assert p.count("<|audio|>") == 1 and p.startswith("<|user|><|audio|>") and p.endswith("<|end|><|assistant|>")
    assert '"WE CALL IT BEAR"' in p


def test_parse_round_trip():
    parsed = parse_answer(target_answer(ROW))
    assert parsed["accuracy"] == 9.0 and parsed["phones"] == "P IY T ER IH G CH D"


def test_parse_is_tolerant():
    assert parse_answer('Sure! {"accuracy": 7, "fluency": "8", "total": 12,} thanks') == {
        "accuracy": 7.0,
        "fluency": 8.0,
        "total": 10.0,
    }
    assert parse_answer('{"accuracy": 7, "transcript": "WE CALL') is None  # unterminated string
    assert parse_answer('{"accuracy": 7, "fluency": 6') == {"accuracy": 7.0, "fluency": 6.0}  # cut at max tokens
    assert parse_answer("no json here") is None
    assert parse_answer('{"accuracy": "high"}') == {}
    assert parse_answer("[1, 2]") is None
