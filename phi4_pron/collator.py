"""Batches of (recording, prompt[, answer]) for Phi-4-multimodal, for training and for generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from phi4_pron.answer import END, Question
from phi4_pron.audio_cache import AUDIO_ROWS, AUDIO_SPAN
from phi4_pron.data import SAMPLING_RATE, decode_audio
from phi4_pron.modeling import tokenizer_audio_token_id

IGNORE_INDEX = -100
QUESTION = "question"  # dataset column: which of the task's questions a row asks (phi4_pron.data.expand_questions)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class PronunciationCollator:
    """Turns corpus rows into model inputs, one question per row (its ``question`` column, or the only one).

    Audio becomes log-mel features (padded, with their mask), or with ``audio_from_table`` the rows of the cached
    audio embeddings that each row's ``audio_span`` names (``audio_rows``, see ``phi4_pron.audio_cache``). The
    tokenizer's audio token is put once per audio embedding between the question's control text and its
    instruction, as ``Phi4MultimodalProcessor`` expands it. The sentence and the answer are tokenised as literal text:
    a special token's spelling in them never becomes a control token. With ``with_answer`` the target answer,
    ``<|end|>`` and EOS follow, and ``labels`` copy only those tokens: prompt, audio placeholders and padding are
    ``-100``. Without it (generation), rows end at ``<|assistant|>``.
    """

    tokenizer: Any
    feature_extractor: Any
    questions: dict[str, Question]
    max_length: int = 2048
    with_answer: bool = True
    padding_side: str = "right"
    pad_to_multiple_of: int = 8  # aligned lengths: tensor-core friendly, and one compiled graph for all batches
    audio_from_table: bool = False  # rows carry ``audio_span`` (phi4_pron.audio_cache): table rows, no audio decoded

    def __post_init__(self) -> None:
        self.audio_token_id = tokenizer_audio_token_id(self.tokenizer)
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.answer_suffix = END + self.tokenizer.eos_token
        self._fixed: dict[str, list[int]] = {}  # ids of the template's own pieces, tokenised once

    def _ids(self, text: str, literal: bool = False) -> list[int]:
        if literal:
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if text not in self._fixed:
            self._fixed[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._fixed[text]

    def question(self, row: dict[str, Any]) -> Question:
        name = row.get(QUESTION)
        if name is None:
            if len(self.questions) != 1:
                raise ValueError(f"row {row.get('id', '?')} names no question; the task asks {list(self.questions)}")
            return next(iter(self.questions.values()))
        return self.questions[name]

    def _sequence(self, row: dict[str, Any], n_audio: int) -> tuple[list[int], list[int]]:
        """The prompt's ids (``n_audio`` audio placeholders) and the answer's (empty for generation)."""
        q = self.question(row)
        before, after = q.prompt(row["text"])
        prompt = self._ids(before) + [self.audio_token_id] * n_audio
        for text, literal in after:
            prompt = prompt + self._ids(text, literal)
        answer = self._ids(q.target(row), literal=True) + self._ids(self.answer_suffix) if self.with_answer else []
        return prompt, answer

    def padded_length(self, n: int) -> int:
        """A batch's width for its longest sequence of ``n`` tokens."""
        return -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of

    def audio_sizes(self, seconds: float) -> tuple[int, int]:
        """(log-mel frames, audio embeddings) of a recording of ``seconds``, as the feature extractor counts them."""
        fe = self.feature_extractor
        frames = (round(seconds * SAMPLING_RATE) - fe.win_length) // fe.hop_length + 1
        per_embedding = fe.audio_compression_rate * fe.audio_downsample_rate  # frames per audio embedding
        return frames, -(-frames * fe.audio_feat_stride // per_embedding)  # rounded up, as the extractor does

    def num_tokens(self, row: dict[str, Any], seconds: float) -> int:
        """The length of the row's sequence (audio embeddings + prompt [+ answer]) from the recording's duration,
        without decoding it: the key for length-grouped batches."""
        return sum(map(len, self._sequence(row, self.audio_sizes(seconds)[1])))

    def _audio_features(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Log-mel features of each recording alone, zero-padded to the longest, with their mask (batches of 2+).

        One at a time because the extractor's batched path fails when a recording is a few samples shorter than
        the longest (its frame masking slices past the last frame; transformers 5.23); alone, a recording's
        features also never depend on its batch mates. Padding frames are zero, as the extractor's own padding frames.
        """
        single = [
            self.feature_extractor(
                [decode_audio(r["audio"], r.get("id", "?"))], sampling_rate=SAMPLING_RATE, return_tensors="pt"
            )
            for r in rows
        ]
        lengths = torch.tensor([f["audio_input_features"].shape[1] for f in single])
        features = torch.zeros(len(rows), int(lengths.max()), single[0]["audio_input_features"].shape[-1])
        for i, f in enumerate(single):
            features[i, : lengths[i]] = f["audio_input_features"][0]
        out = {
            "audio_input_features": features,
            "audio_embed_sizes": torch.cat([f["audio_embed_sizes"] for f in single]),
        }
        if len(rows) > 1:  # as the extractor: no mask for a batch of one
            out["audio_attention_mask"] = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        return out

    def _audio_rows(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The cached embeddings' table rows of each recording, one after another, and their counts."""
        try:
            spans = [r[AUDIO_SPAN] for r in rows]
        except KeyError:
            raise ValueError(
                f"audio_from_table=True but the rows have no {AUDIO_SPAN!r} column: make the dataset with "
                "phi4_pron.audio_cache.cache_audio_embeddings."
            ) from None
        table_rows = torch.cat([torch.arange(start, start + n) for start, n in spans])
        return {AUDIO_ROWS: table_rows}, torch.tensor([n for _, n in spans])

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.audio_from_table:
            audio, sizes = self._audio_rows(rows)
        else:
            audio = self._audio_features(rows)
            sizes = audio["audio_embed_sizes"]
        sequences, label_seqs = [], []
        for row, n_audio in zip(rows, sizes.tolist(), strict=True):
            prompt, answer = self._sequence(row, n_audio)
            ids = prompt + answer
            if len(prompt) >= self.max_length or (answer and len(ids) > self.max_length):
                raise ValueError(
                    f"utterance {row.get('id', '?')}: {len(ids)} tokens ({n_audio} of them audio) exceed "
                    f"model.max_length={self.max_length}; raise it or drop overly long recordings."
                )
            sequences.append(ids)
            label_seqs.append([IGNORE_INDEX] * len(prompt) + answer)

        batch = {"input_ids": self._pad(sequences, self.pad_token_id)}
        batch["attention_mask"] = self._pad([[1] * len(s) for s in sequences], 0)
        if self.with_answer:
            batch["labels"] = self._pad(label_seqs, IGNORE_INDEX)
        return {**batch, **audio}

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = self.padded_length(max(len(s) for s in seqs))
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = torch.tensor(s)
            else:
                out[i, width - len(s) :] = torch.tensor(s)
        return out
