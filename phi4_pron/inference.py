"""Load a trained adapter for inference and generate answers in batches."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.generation import utils as generation_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

from phi4_pron.answer import END, TASK_FILE, Question, questions_from_config
from phi4_pron.audio_cache import AUDIO_ROWS, embed_from_table
from phi4_pron.collator import PronunciationCollator, pad_token_id
from phi4_pron.modeling import (
    ADAPTER_CONFIG,
    ModelPathError,
    attach_lora_from,
    audio_token_id,
    load_base_model,
    load_tokenizer_and_features,
    mark_sizes_static,
)

DECODE_ATTENTION = "sdpa_packed_decode"


def prompt_positions(query, key, value, attention_mask):
    """A prompt's keys, values and mask cut to the prompt's own positions. ``generate`` writes a prompt into an empty
    static cache from position 0 (it never continues a cache with more than one token at a time), so the cache's
    positions behind the prompt are empty and masked: attending to them is wasted work (832 cached positions for
    550-token APA prompts)."""
    n = query.shape[2]
    return key[:, :, :n], value[:, :, :n], None if attention_mask is None else attention_mask[..., :n]


def left_padded_segments(attention_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Flash attention's cumulative sequence offsets (int32) for a left-padded batch of prompts read as one sequence
    of batch x width tokens, from its boolean mask (batch, 1, width, width; True: attends), without a host sync.

    Segment 0 is row 0's padding, segment i row i-1's tokens followed by row i's padding, the last one row b-1's
    tokens. Under causal attention a row's tokens see exactly themselves, as under the mask (its padding comes after
    them); a padding position sees only what precedes it in its segment, so it stays finite (no query reads it).
    """
    width = attention_mask.shape[-1]
    lengths = attention_mask[:, 0, -1].sum(-1).expand(batch)  # a left-padded row's last position sees the row
    starts = torch.arange(batch, device=lengths.device) * width + width - lengths
    ends = starts.new_full((1,), batch * width)
    return torch.cat([starts.new_zeros(1), starts, ends]).to(torch.int32)


def flash_prompt_attention(module, query, key, value, attention_mask, scaling=None):
    """Causal flash attention over a left-padded batch of prompts (:func:`left_padded_segments`), key/value heads
    shared by their query heads as flash does it. The same as SDPA under the padding mask, which cannot take flash
    (a mask rules it out) and computes every masked position in its memory-efficient kernel: 2.6x the time of this
    in an APA batch on an H200 (experiments/benchmarks/eval.md)."""
    batch, heads, width, dim = query.shape
    tokens = batch * width
    segments = left_padded_segments(attention_mask, batch)
    out = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2).reshape(tokens, heads, dim),
        key.transpose(1, 2).reshape(tokens, key.shape[1], dim),
        value.transpose(1, 2).reshape(tokens, value.shape[1], dim),
        segments,
        segments,
        2 * width,  # a segment's longest: a row and the next row's padding
        2 * width,
        0.0,
        True,
        False,
        scale=scaling,
    )[0]
    return out.view(batch, width, heads, dim), None


def decode_segments(attention_mask: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention's key offsets and key counts (int32) for a decoding step (one query token a row) over a
    head-major static cache (batch, kv_heads, length, dim) read as one sequence of batch x kv_heads x length keys,
    from the step's boolean mask (batch, 1, 1, length; True: attends), without a host sync.

    Segment i is row i // kv_heads's key/value head i % kv_heads: it starts at the row's first attended position (its
    left padding skipped) and counts the positions the row attends (the cache's empty tail skipped), which follow
    each other (a left-padded row attends to one run of positions).
    """
    rows = attention_mask[:, 0, -1]
    batch, length = rows.shape
    first = rows.int().argmax(-1)  # the first True
    starts = torch.arange(batch * kv_heads, device=rows.device) * length + first.repeat_interleave(kv_heads)
    offsets = torch.cat([starts, starts.new_full((1,), batch * kv_heads * length)]).to(torch.int32)
    return offsets, rows.sum(-1).repeat_interleave(kv_heads).to(torch.int32)


def flash_decode_attention(module, query, key, value, attention_mask, scaling=None):
    """A decoding step's attention (one query token a row) through flash attention, straight over the static cache:
    each row's key/value heads read from its first prompt position to its current one (:func:`decode_segments`),
    once for all their query heads (a key/value head's query heads are its segment's query tokens; no causal mask
    among them). The same as SDPA under the padding mask, which cannot take flash and reads every cached position,
    padding and empty tail included, in its memory-efficient kernel."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    key_offsets, key_counts = decode_segments(attention_mask, kv_heads)
    query_offsets = torch.arange(batch * kv_heads + 1, device=query.device, dtype=torch.int32) * groups
    out = torch.ops.aten._flash_attention_forward(
        query.reshape(batch * heads, 1, dim),
        key.view(batch * kv_heads * length, 1, dim),
        value.view(batch * kv_heads * length, 1, dim),
        query_offsets,
        key_offsets,
        groups,
        length,
        0.0,
        False,
        False,
        scale=scaling,
        seqused_k=key_counts,
    )[0]
    return out.view(batch, 1, heads, dim), None


@functools.cache
def has_flash(device: torch.device) -> bool:
    """PyTorch's flash kernels run on this GPU: built with them, and an Ampere or newer card (not a V100 or T4)."""
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def uses_flash(module, query, attention_mask) -> bool:
    """A padded prompt batch in the decoder, in half precision on a GPU with flash kernels: it takes
    :func:`flash_prompt_attention`."""
    return (
        isinstance(module, phi4_modeling.Phi4MultimodalAttention)
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and has_flash(query.device)
    )


def sdpa_packed_decode(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA for generation. A prompt attends to its own positions only (:func:`prompt_positions`; ``sdpa`` crops the
    empty cache only where no mask is needed, so not for padded batches), through flash attention where
    :func:`uses_flash`. A single query token's heads are packed onto their key/value heads, so the cache is read once
    (``sdpa`` does that in eager mode only: compiled, it repeats every key/value head for each of its query heads, a
    copy of the whole cache per layer and step), through flash attention over each row's own positions where
    :func:`uses_flash` (:func:`flash_decode_attention`).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    q_len, plain = query.shape[2], kwargs.get("position_bias") is None
    if q_len > 1 and plain:
        if key.shape[2] > q_len:
            key, value, attention_mask = prompt_positions(query, key, value, attention_mask)
        if uses_flash(module, query, attention_mask):
            return flash_prompt_attention(module, query, key, value, attention_mask, scaling)
    if q_len != 1 or groups == 1 or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if uses_flash(module, query, attention_mask) and key.is_contiguous() and value.is_contiguous():
        return flash_decode_attention(module, query, key, value, attention_mask, scaling)
    return packed_decode_attention(module, query, key, value, attention_mask, scaling)


def packed_decode_attention(module, query, key, value, attention_mask, scaling=None):
    """A decoding step's attention through SDPA, each key/value head's query heads packed onto it (the cache read
    once), every cached position read under the mask."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, heads // kv_heads, dim), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, sdpa_packed_decode)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi-4's RMSNorm (``Phi4MultimodalRMSNorm``: float32 inside)."""
    x = hidden.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def gated_mlp(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Phi-4's MLP (``Phi4MultimodalMLP``, SiLU): ``down(up * silu(gate))``."""
    gate, up = torch.nn.functional.linear(hidden, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(up * torch.nn.functional.silu(gate), down)


_eager_rotary = phi4_modeling.apply_rotary_pos_emb
# compiled on first use, one dynamic-shape graph each, shared by every layer
_compiled_norm, _compiled_mlp, _compiled_rotary = (
    torch.compile(f, dynamic=True) for f in (rms_norm, gated_mlp, _eager_rotary)
)


def is_prompt(hidden: torch.Tensor, seq_dim: int = 1) -> bool:
    """Several tokens a row, on a GPU, without autograd (so never in training): what runs compiled."""
    return hidden.shape[seq_dim] > 1 and hidden.is_cuda and not torch.is_grad_enabled()


def _prompt_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' own rotary embedding, compiled for prompts (:func:`is_prompt`) and computed token-major.

    Phi-4's attention hands it head-major views (batch, heads, tokens, dim) of its token-major projection; rotated as
    they are, the compiled kernel writes a transposed copy: 7.4 ms a layer for an APA batch of 256 on an H200, 5.2 ms
    token-major (experiments/benchmarks/eval.md). The result is handed back as the same head-major views. The heads
    and the head and rotary widths are static in the graph (:func:`phi4_pron.modeling.mark_sizes_static`)."""
    if not is_prompt(q, seq_dim=2) or unsqueeze_dim != 1:
        return _eager_rotary(q, k, cos, sin, unsqueeze_dim)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    mark_sizes_static(q, k, cos, sin)
    q, k = _compiled_rotary(q, k, cos, sin, 2)
    return q.transpose(1, 2), k.transpose(1, 2)


def compile_prompt_blocks(model) -> int:
    """Prompts (:func:`is_prompt`) run every RMSNorm and MLP of the decoder as two compiled graphs shared by all
    layers, and the rotary embedding as a third (transformers' function, replaced in its module by one that calls the
    compiled copy for prompts); one-token steps keep the eager code, which transformers compiles whole with a static
    cache. The decoder layers themselves cannot be compiled for prompts as one graph: each indexes the cache by its
    number. For a merged model (LoRA folded in), as evaluation loads it. Returns how many modules run compiled (0:
    left as it is: not Phi-4's MLP, or LoRA layers not merged).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    mlps = [layer.mlp for layer in decoder.layers]
    plain = all(type(m.gate_up_proj) is type(m.down_proj) is torch.nn.Linear for m in mlps)
    if decoder.config.hidden_act != "silu" or not plain:
        return 0
    norms = [decoder.norm] + [
        m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]

    def prompt_norm(norm):
        eager = norm.forward
        return lambda h: _compiled_norm(h, norm.weight, norm.variance_epsilon) if is_prompt(h) else eager(h)

    def prompt_mlp(mlp):
        eager = mlp.forward
        return lambda h: _compiled_mlp(h, mlp.gate_up_proj.weight, mlp.down_proj.weight) if is_prompt(h) else eager(h)

    for norm in norms:
        norm.forward = prompt_norm(norm)
    for mlp in mlps:
        mlp.forward = prompt_mlp(mlp)
    phi4_modeling.apply_rotary_pos_emb = _prompt_rotary
    return len(norms) + len(mlps)


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


KEPT_CACHE = "_phi4_pron_static_cache"  # the model's attribute holding (size, cache) for static_cache_reused


def forget_static_cache_length(model) -> None:
    """Let the next static cache be as short as its batch needs, and free the one kept for reuse
    (:func:`static_cache_reused`): transformers' ``generate`` keeps the longest static cache length it has used
    (``_previous_max_cache_length``) and never allocates a shorter one after it."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        for name in ("_previous_max_cache_length", KEPT_CACHE):
            if m is not None and hasattr(m, name):
                delattr(m, name)


def _deferred_where_safe(device, cache, cache_is_returned, is_assistant) -> bool:
    """transformers' own condition for deferring the stop check (``DeferredStopCheck.is_supported``), on CUDA too."""
    if device.type != "cuda" or is_assistant:
        return False
    return cache is None or cache.is_croppable or not cache_is_returned


@contextlib.contextmanager
def stop_check_one_step_late():
    """Let ``generate`` on a GPU learn that every row has finished one step late, as it does on Apple's MPS only
    (``DeferredStopCheck``: "we should enable it for cuda if we observe perf gains"). Otherwise it waits for the GPU
    at every step (``unfinished_sequences.max() == 0``) and the GPU waits while the host prepares the next step; at
    worst one step more is computed, and dropped. The answers are the same. (A transformers without it: as it is.)"""
    deferred = getattr(generation_utils, "DeferredStopCheck", None)
    if deferred is None:
        yield
        return
    original = deferred.__dict__["is_supported"]
    deferred.is_supported = staticmethod(_deferred_where_safe)
    try:
        yield
    finally:
        deferred.is_supported = original


AUDIO_INPUTS = ("audio_input_features", "audio_embed_sizes", "audio_attention_mask")


@contextlib.contextmanager
def audio_read_at_prefill_only():
    """Let ``generate`` pass Phi-4's audio inputs to the prefill only. It drops a model's multimodal inputs after the
    prefill by the names in its list (``MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL``), which lacks Phi-4's: so every
    decoding step got the batch's audio features again, and ``Phi4MultimodalModel`` asks
    ``(input_ids == audio_token_id).any()`` for them, a graph break in the compiled step and a wait for the GPU.
    A generated token is never the audio placeholder (``suppress_tokens``), so the answers are the same. (A
    transformers without that list: as it is.)"""
    names = getattr(generation_utils, "MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL", None)
    if names is None:
        yield
        return
    generation_utils.MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL = names + AUDIO_INPUTS
    try:
        yield
    finally:
        generation_utils.MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL = names


@contextlib.contextmanager
def static_cache_reused():
    """Let ``generate`` reuse the static cache of its model's last call (reset) when it needs one of the same size.
    It builds a new one every call (``_prepare_static_cache``), at new addresses, so torch records the compiled
    decoding step's CUDA graph again at every call (20 recordings for a test split,
    experiments/benchmarks/eval.md). The cache stays on the model until :func:`forget_static_cache_length`. (A
    transformers without that method: as it is.)"""
    from transformers import GenerationMixin

    prepare = GenerationMixin.__dict__.get("_prepare_static_cache")
    if prepare is None:
        yield
        return

    def reused(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        size = (cache_implementation, batch_size, max(max_cache_len, getattr(self, "_previous_max_cache_length", -1)))
        kept = getattr(self, KEPT_CACHE, None)
        if kept is not None and kept[0] == size and prefill_chunk_size is None:
            kept[1].reset()
            return kept[1]
        if kept is not None:
            delattr(self, KEPT_CACHE)  # its memory freed before the next one is allocated
        cache = prepare(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs)
        object.__setattr__(self, KEPT_CACHE, (size, cache))
        return cache

    GenerationMixin._prepare_static_cache = reused
    try:
        yield
    finally:
        GenerationMixin._prepare_static_cache = prepare


@torch.inference_mode()
def generate_from_batch(
    model,
    tokenizer,
    batch: dict[str, torch.Tensor],
    budgets: Sequence[int],
    cache_len: int | None = None,
    audio_table: torch.Tensor | None = None,
) -> list[str]:
    """Greedy answers for one collated batch (from :func:`generation_collator`), prompt stripped, each row's cut at
    its own number of new tokens (``budgets``: its question's cap), whatever its batch mates need. A batch collated
    from ``audio_table`` (``audio_rows``, :mod:`phi4_pron.audio_cache`) takes its audio embeddings from there.

    ``cache_len``: a static cache of that many positions (at least the prompt + the largest budget), with which
    transformers compiles the decoding step on a GPU (Inductor + CUDA graphs, transformers' default
    ``CompileConfig``); batches of one size and cache length reuse that compile and that cache
    (:func:`static_cache_reused`; free it with :func:`forget_static_cache_length`). On a CPU it runs eagerly.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if AUDIO_ROWS in batch:  # the prefill reads the table's embeddings; the decoding steps the ids
        batch = {**embed_from_table(model, batch, audio_table), "input_ids": batch["input_ids"]}
    extra = {"cache_implementation": "static", "max_cache_len": cache_len} if cache_len else {}
    with stop_check_one_step_late(), audio_read_at_prefill_only(), static_cache_reused():
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
