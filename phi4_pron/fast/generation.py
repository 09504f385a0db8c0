"""``generate`` on the fast path: a static cache reused between batches, the stop check one step late, Phi-4's audio
read by the prefill only, and the attention of :mod:`.attention`; all inside :func:`fast_generation`, undone on exit.
Each leaves the answers as they are; where a transformers lacks the hook one patches, it stays as it is."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import GenerationMixin
from transformers.generation import utils as generation_utils

from phi4_pron.fast.attention import decode_attention, sdpa_without_cudnn
from phi4_pron.fast.prompt_blocks import compiled_prompt_blocks

STATIC_CACHE_STEP = 64  # a static cache's length is rounded up to a multiple of this
KEPT_CACHE = "_phi4_pron_static_cache"  # the model's attribute holding (size, cache) for static_cache_reused
AUDIO_INPUTS = ("audio_input_features", "audio_embed_sizes", "audio_attention_mask")


def static_cache_len(tokens: int) -> int:
    """Positions a static cache needs for ``tokens`` (prompt + answer), rounded up."""
    return -(-tokens // STATIC_CACHE_STEP) * STATIC_CACHE_STEP


def forget_static_cache_length(model) -> None:
    """Let the next static cache be as short as its batch needs, and free the one kept for reuse: ``generate`` keeps
    the longest static cache length it has used (``_previous_max_cache_length``) and never allocates a shorter one."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        for name in ("_previous_max_cache_length", KEPT_CACHE):
            if m is not None and name in vars(m):  # its own (a PEFT wrapper forwards lookups to its base)
                delattr(m, name)


def _deferred_where_safe(device, cache, cache_is_returned, is_assistant) -> bool:
    """transformers' own condition for deferring the stop check (``DeferredStopCheck.is_supported``), on CUDA too."""
    if device.type != "cuda" or is_assistant:
        return False
    return cache is None or cache.is_croppable or not cache_is_returned


@contextlib.contextmanager
def stop_check_one_step_late() -> Iterator[None]:
    """``generate`` on a GPU learns that every row has finished one step late, as it does on Apple's MPS only.
    Otherwise it waits for the GPU at every step (``unfinished_sequences.max() == 0``) and the GPU waits while the
    host prepares the next step; at worst one step more is computed, and dropped."""
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


@contextlib.contextmanager
def audio_read_at_prefill_only() -> Iterator[None]:
    """``generate`` passes Phi-4's audio inputs to the prefill only. It drops a model's multimodal inputs after the
    prefill by the names in ``MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL``, which lacks Phi-4's: every decoding step
    got the audio again, and ``(input_ids == audio_token_id).any()`` broke the compiled step's graph and waited for
    the GPU. A generated token is never the audio placeholder (``suppress_tokens``)."""
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
def static_cache_reused() -> Iterator[None]:
    """``generate`` reuses the static cache of its model's last call (reset) when it needs one of the same size.
    It builds a new one every call, at new addresses, so torch would record the compiled decoding step's CUDA graph
    again at every call. The cache stays on the model until :func:`forget_static_cache_length`."""
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


@contextlib.contextmanager
def fast_generation(model, compile_prompts: bool = False) -> Iterator[None]:
    """Generation with ``model`` on the fast path while inside: the attention of :mod:`.attention`, the ``generate``
    patches above, and with ``compile_prompts`` (a merged model on a GPU) the prompts' compiled blocks. On exit the
    model, transformers and torch are as they were, and the kept static cache is freed."""
    forget_static_cache_length(model)
    with contextlib.ExitStack() as stack:
        stack.callback(forget_static_cache_length, model)
        stack.enter_context(sdpa_without_cudnn())
        stack.enter_context(decode_attention(model))
        stack.enter_context(stop_check_one_step_late())
        stack.enter_context(audio_read_at_prefill_only())
        stack.enter_context(static_cache_reused())
        if compile_prompts:
            stack.enter_context(compiled_prompt_blocks(model))
        yield
