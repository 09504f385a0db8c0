"""Load a trained adapter for inference and generate answers in batches."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phi4_pron.answer import END, TASK_FILE, Question, questions_from_config
from phi4_pron.collator import PronunciationCollator, pad_token_id
from phi4_pron.modeling import (
    ADAPTER_CONFIG,
    ModelPathError,
    attach_lora_from,
    audio_token_id,
    load_base_model,
    load_tokenizer_and_features,
)

DECODE_ATTENTION = "sdpa_packed_decode"


def sdpa_packed_decode(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA; a single query token's heads are packed onto their key/value heads, so the cache is read once.

    ``sdpa`` does the same in eager mode only: compiled, it repeats every key/value head for each of its query heads
    (a copy of the whole cache per layer and step), which made compiled decoding slower than eager.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, sdpa_packed_decode)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def load_adapter_for_inference(
    adapter_dir: str | Path,
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    merge: bool = True,
):
    """(model, tokenizer, feature extractor, questions): the base model named in ``adapter_config.json`` with the
    adapter (any key layout, every tensor checked), the processing saved beside it, and the questions of its
    ``task.json`` (a run's final_model/ or checkpoint-epoch-N/).

    ``merge`` folds the LoRA weights into the base weights: the same function, and generation 1.6x faster
    (experiments/benchmarks/eval.md). ``sdpa`` becomes :data:`DECODE_ATTENTION` (the same, faster compiled).
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.exists():
        raise ModelPathError(
            f"{adapter_dir} has no adapter_config.json: give a run's final_model/ or checkpoint-epoch-N/ folder."
        )
    adapter_cfg = json.loads(config_file.read_text())
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ModelPathError(f"{config_file} names no base_model_name_or_path; set it to the base checkpoint.")
    questions = saved_questions(adapter_dir)
    revision = None if Path(base).expanduser().is_dir() else adapter_cfg.get("revision")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_base_model(base, revision, torch_dtype, attn_implementation)
    model, _ = attach_lora_from(model, str(adapter_dir))
    model = (model.merge_and_unload() if merge else model).to(device).eval()
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(DECODE_ATTENTION)
    has_processing = all((adapter_dir / f).exists() for f in ("tokenizer_config.json", "preprocessor_config.json"))
    if has_processing:
        tokenizer, feature_extractor = load_tokenizer_and_features(str(adapter_dir))
    else:
        tokenizer, feature_extractor = load_tokenizer_and_features(base, revision)
    audio_token_id(tokenizer, model.config)
    return model, tokenizer, feature_extractor, questions


def saved_questions(adapter_dir: Path) -> dict[str, Question]:
    """The questions an adapter was trained on: its ``task.json``, else its run's ``training_config.json``."""
    task_file = adapter_dir / TASK_FILE
    if task_file.exists():
        return questions_from_config(json.loads(task_file.read_text()))
    run_record = adapter_dir.parent / "training_config.json"
    task = json.loads(run_record.read_text())["config"].get("task") if run_record.exists() else None
    if task is not None:
        return questions_from_config(task)
    raise ModelPathError(
        f"{adapter_dir} has no {TASK_FILE} (and no training_config.json beside it): the questions this adapter "
        "answers are unknown. Copy the run's task.json there."
    )


def batches(rows: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield [rows[j] for j in range(i, min(i + size, len(rows)))]


def generation_collator(tokenizer, feature_extractor, questions: dict[str, Question]) -> PronunciationCollator:
    """Prompts only, padded on the left so every row's answer starts at the same position."""
    return PronunciationCollator(tokenizer, feature_extractor, questions, with_answer=False, padding_side="left")


def placeholder_ids(config) -> list[int]:
    """The audio and image placeholder ids of a Phi-4-multimodal config."""
    return [config.audio_config.audio_token_id, config.vision_config.image_token_id]


STATIC_CACHE_STEP = 64  # a static cache's length is rounded up to a multiple of this


def static_cache_len(prompt_tokens: int, max_new_tokens: int) -> int:
    """Positions a static cache needs for a batch of ``prompt_tokens``-token prompts, rounded up."""
    return -(-(prompt_tokens + max_new_tokens) // STATIC_CACHE_STEP) * STATIC_CACHE_STEP


def forget_static_cache_length(model) -> None:
    """Let the next static cache be as short as its batch needs: transformers' ``generate`` keeps the longest
    static cache length it has used (``_previous_max_cache_length``) and never allocates a shorter one after it."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is not None and hasattr(m, "_previous_max_cache_length"):
            del m._previous_max_cache_length


@torch.inference_mode()
def generate_from_batch(
    model,
    tokenizer,
    batch: dict[str, torch.Tensor],
    budgets: Sequence[int],
    cache_len: int | None = None,
) -> list[str]:
    """Greedy answers for one collated batch (from :func:`generation_collator`), prompt stripped, each row's cut at
    its own number of new tokens (``budgets``: its question's cap), whatever its batch mates need.

    ``cache_len``: a static cache of that many positions (at least the prompt + the largest budget), with which
    transformers compiles the decoding step on a GPU (Inductor + CUDA graphs, transformers' default
    ``CompileConfig``); batches of one size and cache length reuse that compile. On a CPU it runs eagerly.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    extra = {"cache_implementation": "static", "max_cache_len": cache_len} if cache_len else {}
    out = model.generate(
        **batch,
        max_new_tokens=max(budgets),
        do_sample=False,
        eos_token_id=[tokenizer.convert_tokens_to_ids(END), tokenizer.eos_token_id],
        pad_token_id=pad_token_id(tokenizer),
        # generate's default (1) slices the prompt's last position as a strided view, which the LM head multiplies
        # as a batched matmul reading the whole 200k-token weight once per row (0.1 s a batch of 256); an index
        # tensor copies the positions first, and the LM head is one matmul.
        logits_to_keep=torch.tensor([-1], device=device),
        # an answer never holds a modality placeholder: one generated would be read as audio at the next step
        suppress_tokens=placeholder_ids(model.config),
        **extra,
    )
    answers = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(a[:n], skip_special_tokens=True) for a, n in zip(answers, budgets, strict=True)]


def generate_answers(
    model,
    tokenizer,
    feature_extractor,
    questions: dict[str, Question],
    rows: list[dict[str, Any]],
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy answers for one batch of rows (each with ``audio``, ``text`` and, where the task asks several, its
    ``question``), prompt stripped; at most ``max_new_tokens``, or the rows' questions' own cap where smaller."""
    collator = generation_collator(tokenizer, feature_extractor, questions)
    budgets = [collator.question(r).answer_budget(max_new_tokens) for r in rows]
    return generate_from_batch(model, tokenizer, collator(rows), budgets)
