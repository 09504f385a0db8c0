"""The one place that defines what the model is asked and what it must answer.

Training builds the target answer from a corpus row with :func:`target_answer`; evaluation and
``phi4_pron.assess`` read the model's text back with :func:`parse_answer`. Both use the same prompt.

Answer format (one JSON object, keys in this order)::

    {"accuracy": 8, "fluency": 9, "prosodic": 8, "total": 8,
     "transcript": "WE CALL IT BEAR",
     "phones": "W IY K AO L IH T B EH R",
     "mispronunciations": [["BEAR", "EH", "AE"]]}

- scores: the corpus's utterance-level integers 0-10;
- ``transcript``: what was said (the prompt text, upper case, as the corpus gives it);
- ``phones``: the phones as pronounced: the canonical phones with each annotated mispronunciation's
  pronounced phone put in its place (``<unk>`` where the annotator could not name it, dropped where
  it is ``<DEL>``), stress digits removed (ARPAbet, 39 phones);
- ``mispronunciations``: the annotated ones, in order, each ``[word, canonical phone, pronounced phone]``.

The instruction is short and the mispronunciations are triples, not objects, because every token costs
training and decoding time (the JSON keys say what each value is); fine-tuning teaches the format.
"""

from __future__ import annotations

import json
import re
from typing import Any

SCORE_KEYS = ("accuracy", "fluency", "prosodic", "total")

# Phi-4-multimodal's chat format; the audio placeholder is expanded to one token per audio embedding.
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
AUDIO_PLACEHOLDER = "<|audio|>"

INSTRUCTION = 'Assess the pronunciation of "{text}" as JSON.'

_STRESS = re.compile(r"(?<=[A-Z])[0-2]$")


def strip_stress(phone: str) -> str:
    """``AH0`` -> ``AH``; other symbols (``<unk>``) unchanged."""
    return _STRESS.sub("", phone)


def prompt_text(text: str) -> str:
    """The user turn up to and including the assistant tag; the answer follows it."""
    return f"{USER}{AUDIO_PLACEHOLDER}{INSTRUCTION.format(text=text.strip())}{END}{ASSISTANT}"


def _word_phones(word: dict[str, Any]) -> list[str]:
    phones = word["phones"]
    return phones.split() if isinstance(phones, str) else list(phones)


def canonical_phones(words: list[dict[str, Any]]) -> list[str]:
    """The canonical (dictionary) phones of an utterance, stress removed."""
    return [strip_stress(p) for w in words for p in _word_phones(w)]


def mispronounced_flags(words: list[dict[str, Any]]) -> list[bool]:
    """One flag per canonical phone: did the annotator mark it mispronounced?"""
    flags: list[bool] = []
    for w in words:
        marked = {int(m["index"]) for m in w.get("mispronunciations") or []}
        flags += [i in marked for i in range(len(_word_phones(w)))]
    return flags


def pronounced_phones(words: list[dict[str, Any]]) -> list[str]:
    """The phones as pronounced: canonical ones with each mispronunciation's pronounced phone substituted."""
    out: list[str] = []
    for w in words:
        subs = {int(m["index"]): m["pronounced-phone"] for m in w.get("mispronunciations") or []}
        for i, p in enumerate(_word_phones(w)):
            said = subs.get(i, p)
            if said.upper() != "<DEL>":
                out.append(strip_stress(said))
    return out


def target_answer(row: dict[str, Any]) -> str:
    """The JSON answer the model is trained to give for one corpus row."""
    answer = {k: int(row[k]) for k in SCORE_KEYS}
    answer["transcript"] = row["text"].strip()
    answer["phones"] = " ".join(pronounced_phones(row["words"]))
    answer["mispronunciations"] = [
        [w["text"], strip_stress(m["canonical-phone"]), strip_stress(m["pronounced-phone"])]
        for w in row["words"]
        for m in w.get("mispronunciations") or []
    ]
    return json.dumps(answer, ensure_ascii=False)


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def parse_answer(raw: str) -> dict[str, Any] | None:
    """Read a model answer back; ``None`` when no JSON object can be recovered. Never raises.

    Tolerates text around the object, trailing commas and missing keys (a missing key is absent from the
    result). Scores are clipped to 0-10; a score that is not a number is dropped.
    """
    start = raw.find("{")
    if start < 0:
        return None
    end = raw.rfind("}")
    candidates = [raw[start : end + 1]] if end > start else []
    candidates.append(raw[start:] + "}")  # answer cut off by the token limit
    for text in candidates:
        try:
            obj = json.loads(_TRAILING_COMMA.sub(r"\1", text))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return _clean(obj)
    return None


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in SCORE_KEYS:
        try:
            out[k] = min(10.0, max(0.0, float(obj[k])))
        except (KeyError, TypeError, ValueError):
            pass
    for k in ("transcript", "phones"):
        if isinstance(obj.get(k), str):
            out[k] = obj[k]
    if isinstance(obj.get("mispronunciations"), list):
        out["mispronunciations"] = obj["mispronunciations"]
    return out
