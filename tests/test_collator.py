"""The collator on a real batch: audio placeholders, padding and exactly-the-answer labels."""

from __future__ import annotations

import torch

from phi4_pron.answer import END, target_answer
from phi4_pron.collator import IGNORE_INDEX, PronunciationCollator


def test_labels_are_exactly_the_answer(tiny_processing, mini_train):
    tokenizer, fe = tiny_processing
    rows = [mini_train[0], mini_train[5], mini_train[7]]
    batch = PronunciationCollator(tokenizer, fe)(rows)
    audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
    b, t = batch["input_ids"].shape
    assert batch["labels"].shape == (b, t) and batch["attention_mask"].shape == (b, t)
    assert batch["audio_input_features"].shape[0] == b and batch["audio_input_features"].shape[-1] == 80
    assert batch["audio_attention_mask"].shape == batch["audio_input_features"].shape[:2]
    for i, row in enumerate(rows):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert int((ids == audio_id).sum()) == int(batch["audio_embed_sizes"][i])
        learned = labels != IGNORE_INDEX
        assert not learned[ids == audio_id].any() and not learned[n:].any()
        answer_ids = labels[learned]
        assert tokenizer.decode(answer_ids) == target_answer(row) + END + tokenizer.eos_token
        # the learned tokens are one contiguous block at the end of the real tokens, equal to the inputs there
        first = int(learned.nonzero()[0])
        assert learned[first:n].all() and torch.equal(ids[first:n], answer_ids)


def test_generation_batch_is_left_padded_without_answer(tiny_processing, mini_train):
    tokenizer, fe = tiny_processing
    batch = PronunciationCollator(tokenizer, fe, with_answer=False, padding_side="left")([mini_train[0], mini_train[1]])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].all()
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch["input_ids"][:, -1] == assistant).all()


def test_too_long_input_is_refused_clearly(tiny_processing, mini_train):
    import pytest

    tokenizer, fe = tiny_processing
    with pytest.raises(ValueError, match="model.max_length=50"):
        PronunciationCollator(tokenizer, fe, max_length=50)([mini_train[0]])
