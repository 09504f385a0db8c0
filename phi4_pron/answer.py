"""The one place that defines what the model is asked about a recording and what it must answer.

A task (``conf/task/``) asks one or more questions per recording. Each question is Phi-4's chat turn

    <|user|>{control}<audio placeholders>{instruction}<|end|><|assistant|>{answer}<|end|><|endoftext|>

and its answer is one JSON object holding some of these fields (their JSON keys are configurable):

- ``accuracy``, ``fluency``, ``prosodic``, ``total``: the corpus's utterance scores, integers 0-10;
- ``transcript``: what was said (the corpus sentence, upper case as the corpus gives it);
- ``phones``: the phones as pronounced, ARPAbet without stress digits: the canonical phones with each annotated
  mispronunciation's pronounced phone in its place (``<unk>`` where the annotator could not name it, dropped where
  it is ``<DEL>``);
- ``mispronunciations``: the annotated ones, in order, each ``[word, canonical phone, pronounced phone]``.

``task=paper`` asks the paper's two questions (APA: the four scores; MDD: ``word_transcript`` and
``phoneme_transcript``), neither containing the sentence; ``task=joint`` asks one compact question with the sentence
in the prompt. Training builds targets with :meth:`Question.target`; evaluation and ``assess`` read answers back with
:meth:`Question.parse` and join a recording's answers into one dict of fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TASK_FILE = "task.json"  # beside every saved adapter: the questions it was trained to answer

SCORE_KEYS = ("accuracy", "fluency", "prosodic", "total")
FIELDS = (*SCORE_KEYS, "transcript", "phones", "mispronunciations")
TEXT_SLOT = "{text}"  # where an instruction puts the prompt sentence (task=joint)

# Phi-4-multimodal's chat format; the audio placeholder (the tokenizer's own) goes between control and instruction.
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"

_STRESS = re.compile(r"(?<=[A-Z])[0-2]$")


def strip_stress(phone: str) -> str:
    """``AH0`` -> ``AH``; other symbols (``<unk>``) unchanged."""
    return _STRESS.sub("", phone)


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


def field_value(row: dict[str, Any], name: str) -> Any:
    """One answer field's true value for a corpus row."""
    if name in SCORE_KEYS:
        return int(row[name])
    if name == "transcript":
        return row["text"].strip()
    if name == "phones":
        return " ".join(pronounced_phones(row["words"]))
    if name == "mispronunciations":
        return [
            [w["text"], strip_stress(m["canonical-phone"]), strip_stress(m["pronounced-phone"])]
            for w in row["words"]
            for m in w.get("mispronunciations") or []
        ]
    raise ValueError(f"unknown answer field {name!r}; fields are {FIELDS}")


@dataclass(frozen=True)
class Question:
    """One question about a recording: its prompt around the audio, the fields its JSON answer holds, their keys."""

    name: str
    instruction: str
    fields: tuple[str, ...]
    control: str = ""  # plain text after <|user|>, before the audio (the paper's <|APA|> / <|MDD|>)
    keys: Mapping[str, str] = field(default_factory=dict)  # field -> JSON key where they differ
    max_new_tokens: int | None = None  # generation stops here (a cap below the evaluation's own); None: no cap

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown or not self.fields:
            raise ValueError(f"question {self.name!r}: fields {list(self.fields)} must be some of {FIELDS}")

    def answer_budget(self, max_new_tokens: int) -> int:
        """New tokens generation allows this question's answer: its own cap, never more than ``max_new_tokens``."""
        return min(max_new_tokens, self.max_new_tokens or max_new_tokens)

    def key(self, name: str) -> str:
        return self.keys.get(name, name)

    def prompt(self, text: str) -> tuple[str, list[tuple[str, bool]]]:
        """The user turn as (text before the audio, [(piece, is_user_text)] after it), ending at ``<|assistant|>``.

        User text (the sentence) is marked so that it is tokenised as literal text, never as control tokens.
        """
        before, _, after = self.instruction.partition(TEXT_SLOT)
        pieces = [(before, False)]
        if TEXT_SLOT in self.instruction:
            pieces += [(text.strip(), True), (after, False)]
        pieces.append((END + ASSISTANT, False))
        return USER + self.control, [p for p in pieces if p[0]]

    def target(self, row: dict[str, Any]) -> str:
        """The JSON answer the model is trained to give for one corpus row."""
        return json.dumps({self.key(f): field_value(row, f) for f in self.fields}, ensure_ascii=False)

    def parse(self, raw: str) -> dict[str, Any] | None:
        """A model answer as fields; ``None`` when no JSON object can be recovered. Never raises."""
        obj = _json_object(raw)
        if obj is None:
            return None
        return _clean({f: obj[self.key(f)] for f in self.fields if self.key(f) in obj})


def questions_from_config(task_cfg: Any) -> dict[str, Question]:
    """The task's questions by name (``conf/task/*.yaml``), in their order."""
    return {
        name: Question(
            name=name,
            instruction=q["instruction"],
            fields=tuple(q["fields"]),
            control=q.get("control") or "",
            keys=dict(q.get("keys") or {}),
            max_new_tokens=q.get("max_new_tokens"),
        )
        for name, q in task_cfg["questions"].items()
    }


def task_info(task_cfg: Any, train_audio_encoder: bool = False) -> dict[str, Any]:
    """What metrics.json says about the questions behind its numbers (``report`` and re-scoring read it)."""
    from omegaconf import OmegaConf

    task = OmegaConf.to_container(task_cfg, resolve=True) if OmegaConf.is_config(task_cfg) else dict(task_cfg)
    return {
        "task": task["name"],
        "comparable_with_paper": bool(task.get("comparable_with_paper")),
        "train_audio_encoder": train_audio_encoder,
        "task_config": task,
    }


def join_parsed(parsed: Mapping[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """A recording's answers (question name -> parsed fields or None) as one dict of fields; None if none parsed."""
    if all(p is None for p in parsed.values()):
        return None
    out: dict[str, Any] = {}
    for p in parsed.values():
        out.update(p or {})
    return out


def join_answers(
    answers: Mapping[str, str | Exception], questions: Mapping[str, Question]
) -> tuple[dict[str, str | None], dict[str, Any] | None, str | None]:
    """One recording's answers (question -> text, or the exception its generation raised) as (raw texts, the parsed
    fields joined or None, the error or None): a recording with a failed question counts as failed."""
    raw = {q: None if isinstance(a, Exception) else a for q, a in answers.items()}
    errors = [f"{q}: {type(a).__name__}: {a}" for q, a in answers.items() if isinstance(a, Exception)]
    if errors:
        return raw, None, "; ".join(errors)
    return raw, join_parsed({q: questions[q].parse(a) for q, a in raw.items()}), None


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _json_object(raw: str) -> dict[str, Any] | None:
    """The JSON object in a model answer: text around it, trailing commas, single quotes (the paper's examples) and
    a cut-off end are tolerated."""
    start = raw.find("{")
    if start < 0:
        return None
    end = raw.rfind("}")
    candidates = [raw[start : end + 1]] if end > start else []
    candidates.append(raw[start:] + "}")  # answer cut off by the token limit
    for text in candidates:
        text = _TRAILING_COMMA.sub(r"\1", text)
        for attempt in (text, _single_to_double_quotes(text)):
            try:
                obj = json.loads(attempt)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


_SINGLE_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'(?=\s*[:,}\]])")


def _single_to_double_quotes(text: str) -> str:
    """``{'accuracy': 8, 'word_transcript': 'WE CALL'}`` as JSON (Python-style quotes of the paper's examples)."""
    return _SINGLE_QUOTED.sub(lambda m: json.dumps(m.group(1)), text)


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    """Scores as floats clipped to 0-10 (a non-number, boolean, NaN or infinity dropped), texts as strings, lists as
    lists."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if k in SCORE_KEYS:
            if isinstance(v, bool):  # JSON true/false: not a score (float(True) would be 1.0)
                continue
            try:
                score = float(v)
            except (TypeError, ValueError):
                continue
            if score == score and abs(score) != float("inf"):
                out[k] = min(10.0, max(0.0, score))
        elif k in ("transcript", "phones"):
            if isinstance(v, str):
                out[k] = v
        elif k == "mispronunciations" and isinstance(v, list):
            out[k] = v
    return out
