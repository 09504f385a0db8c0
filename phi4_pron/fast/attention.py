"""Attention for generation: left-padded prompts and single-token decoding steps through flash attention.

:func:`sdpa_packed_decode` is an attention function registered with transformers under :data:`DECODE_ATTENTION` by
:func:`decode_attention` (and unregistered on exit); it computes what ``sdpa`` computes under the padding mask.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

DECODE_ATTENTION = "sdpa_packed_decode"


def prompt_positions(query, key, value, attention_mask):
    """A prompt's keys, values and mask cut to the prompt's own positions. ``generate`` writes a prompt into an empty
    static cache from position 0, so the positions behind it are empty and masked: attending to them is wasted."""
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
    shared by their query heads as flash does it. SDPA under the padding mask cannot take flash and computes every
    masked position."""
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
    """A decoding step's attention straight over the static cache: each row's key/value heads read from its first
    prompt position to its current one (:func:`decode_segments`), once for all their query heads (a key/value head's
    query heads are its segment's query tokens; no causal mask among them)."""
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
    """A padded batch in the decoder, in half precision on a GPU with flash kernels."""
    return (
        isinstance(module, phi4_modeling.Phi4MultimodalAttention)
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and has_flash(query.device)
    )


def packed_decode_attention(module, query, key, value, attention_mask, scaling=None):
    """A decoding step's attention through SDPA, each key/value head's query heads packed onto it (the cache read
    once), every cached position read under the mask."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, heads // kv_heads, dim), key, value, attn_mask=attention_mask, scale=scaling
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


def sdpa_packed_decode(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """SDPA for generation. A prompt attends to its own positions only, through flash attention where
    :func:`uses_flash`. A single query token's heads are packed onto their key/value heads, so the cache is read once
    (compiled, ``sdpa`` repeats every key/value head for each of its query heads: a copy of the whole cache per layer
    and step), through flash attention over each row's own positions where :func:`uses_flash`."""
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


@contextlib.contextmanager
def decode_attention(model) -> Iterator[None]:
    """``model`` attends through :func:`sdpa_packed_decode` while inside (where it uses ``sdpa``); on exit its
    attention is ``sdpa`` again and the name is unregistered from transformers."""
    if model.config._attn_implementation != "sdpa":
        yield
        return
    added = [
        (interface, fn)
        for interface, fn in ((AttentionInterface, sdpa_packed_decode), (AttentionMaskInterface, sdpa_mask))
        if DECODE_ATTENTION not in interface._global_mapping
    ]
    for interface, fn in added:
        interface.register(DECODE_ATTENTION, fn)
    model.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
        for interface, _ in added:
            interface._global_mapping.pop(DECODE_ATTENTION, None)


@contextlib.contextmanager
def sdpa_without_cudnn() -> Iterator[None]:
    """SDPA never takes cuDNN's attention inside: it plans anew for every new sequence length (about 2 ms of CPU per
    layer call), and lengths change with every batch and decoding step; flash and memory-efficient kernels do not."""
    if not torch.cuda.is_available():
        yield
        return
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
