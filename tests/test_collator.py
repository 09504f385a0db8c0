"""The collator on a real batch: audio placeholders, padding and exactly-the-answer labels."""

from __future__ import annotations

import pytest
import torch
from conftest import task_questions

from phi4_pron.answer import END
from phi4_pron.collator import IGNORE_INDEX, PronunciationCollator

PAPER, JOINT = task_questions("paper"), task_questions("joint")


def collator(tiny_processing, questions=JOINT, **kwargs):
    return PronunciationCollator(*tiny_processing, questions, **kwargs)


@pytest.mark.parametrize("question", ["apa", "mdd", "joint"])
def test_labels_are_exactly_the_answer(tiny_processing, mini_train, question):
    tokenizer, fe = tiny_processing
    questions = JOINT if question == "joint" else PAPER
    rows = [{**mini_train[i], "question": question} for i in (0, 5, 7)]
    batch = PronunciationCollator(tokenizer, fe, questions)(rows)
    audio_id = tokenizer.audio_token_id
    assert tokenizer.audio_token == "<|endoftext11|>"  # the published checkpoint's audio placeholder
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
        assert tokenizer.decode(answer_ids) == questions[question].target(row) + END + tokenizer.eos_token
        # the learned tokens are one contiguous block at the end of the real tokens, equal to the inputs there
        first = int(learned.nonzero()[0])
        assert learned[first:n].all() and torch.equal(ids[first:n], answer_ids)


def test_generation_batch_is_left_padded_without_answer(tiny_processing, mini_train):
    tokenizer, fe = tiny_processing
    batch = collator(tiny_processing, with_answer=False, padding_side="left")([mini_train[0], mini_train[1]])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].all()
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (batch["input_ids"][:, -1] == assistant).all()


def test_too_long_input_is_refused_clearly(tiny_processing, mini_train):
    with pytest.raises(ValueError, match="model.max_length=50"):
        collator(tiny_processing, max_length=50)([mini_train[0]])


def test_token_count_from_duration_matches_the_batch(tiny_processing, mini_train):
    """The length-grouping key (computed from the duration, audio not decoded) is the collated length."""
    from phi4_pron.data import SAMPLING_RATE, decode_audio

    tokenizer, fe = tiny_processing
    c = collator(tiny_processing)
    for i in (0, 5, 7, 12):
        row = mini_train[i]
        n = len(decode_audio(row["audio"]))
        batch = c([row])
        assert c.num_tokens(row, n / SAMPLING_RATE) == int(batch["attention_mask"].sum())


def test_features_of_nearly_equal_lengths(tiny_processing, mini_train):
    """Recordings 7 samples apart (the extractor's batched path fails on them): each row's features are its own."""
    from phi4_pron.data import decode_audio

    tokenizer, fe = tiny_processing
    wave = decode_audio(mini_train[0]["audio"])[:48007]
    rows = [
        {**mini_train[0], "audio": wave},
        {**mini_train[1], "audio": wave[:48000]},
        {**mini_train[2], "audio": wave[:20000]},
    ]
    batch = collator(tiny_processing)(rows)
    for i, row in enumerate(rows):
        alone = fe([row["audio"]], sampling_rate=16000, return_tensors="pt")["audio_input_features"][0]
        n = alone.shape[0]
        assert torch.equal(batch["audio_input_features"][i, :n], alone)
        assert int(batch["audio_attention_mask"][i].sum()) == n and not batch["audio_input_features"][i, n:].any()


def test_length_key_is_the_token_count(tiny_processing, mini_train):
    """``with_lengths`` + ``num_tokens`` (from the WAV header's duration) give each row's collated length."""
    from phi4_pron.data import with_lengths

    c = collator(tiny_processing)
    ds = with_lengths(mini_train.select(range(3)), c.num_tokens)
    assert ds["length"] == [int(c([row])["attention_mask"].sum()) for row in ds]


def test_prompt_holds_exactly_n_audio_ids_equal_to_the_models(tiny_processing, tiny_model_dir, mini_train):
    from transformers import AutoConfig

    tokenizer, _ = tiny_processing
    config = AutoConfig.from_pretrained(tiny_model_dir)
    batch = collator(tiny_processing, PAPER)([{**mini_train[3], "question": "mdd"}])
    n_audio = int(batch["audio_embed_sizes"][0])
    assert n_audio > 10 and int((batch["input_ids"] == config.audio_config.audio_token_id).sum()) == n_audio
    assert tokenizer.audio_token_id == config.audio_config.audio_token_id


def test_special_tokens_in_the_sentence_are_literal_text(tiny_processing, mini_train):
    tokenizer, _ = tiny_processing
    row = {**mini_train[0], "text": "WE <|end|> CALL <|endoftext11|> IT"}
    prompt, answer = collator(tiny_processing)._sequence(row, n_audio=5)
    special = {tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext11|>", "<|assistant|>")}
    end, audio, assistant = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext11|>", "<|assistant|>")
    )
    assert prompt.count(audio) == 5 and prompt.count(end) == 1 and prompt.count(assistant) == 1  # the template's own
    assert answer.count(end) == 1 and not special & set(answer[:-2])
    assert "<|end|> CALL <|endoftext11|>" in tokenizer.decode(prompt)
