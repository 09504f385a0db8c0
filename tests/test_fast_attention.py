"""phi4_pron.fast.attention: the prompts' and decoding steps' attention against SDPA under the padding mask
(flash attention's variable-length kernel emulated on the CPU), and its registration undone on exit."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_decode_attention_equals_repeated_heads(compiled):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from phi4_pron.fast.attention import sdpa_packed_decode

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # 6 query heads on 2 key/value heads
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5]).view(2, 1, 1, 5)  # row 0 left-padded
    attend = torch.compile(sdpa_packed_decode, backend="eager", fullgraph=True) if compiled else sdpa_packed_decode
    out, _ = attend(module, q, k, v, mask, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask, scale=0.5
    )
    torch.testing.assert_close(out, ref.transpose(1, 2))


def _left_padded(lengths: list[int], width: int):
    """A left-padded batch's boolean mask (batch, 1, width, width; True: attends) and its real positions."""
    import torch

    pos = torch.arange(width)
    real = pos[None] >= (width - torch.tensor(lengths))[:, None]
    return ((pos[:, None] >= pos[None, :]) & real[:, None, :])[:, None], real


def test_a_prompt_attends_to_its_own_positions_not_the_empty_cache():
    """Prefill into a static cache: the cache's empty tail (garbage here) is cut off, the result is the prompt's own
    causal, padded attention."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from phi4_pron.fast.attention import sdpa_packed_decode

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    mask, _ = _left_padded([4, 2], 4)
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # cache of 7 positions
    full_mask = torch.cat([mask, torch.zeros(2, 1, 4, 3, dtype=torch.bool)], dim=-1)  # the tail is masked
    out, _ = sdpa_packed_decode(module, q, k, v, full_mask, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k[:, :, :4], 3), repeat_kv(v[:, :, :4], 3), attn_mask=mask, scale=0.5
    )
    real = mask[:, 0].any(-1)  # a fully padded query row is undefined either way
    torch.testing.assert_close(out[real.nonzero(as_tuple=True)], ref.transpose(1, 2)[real.nonzero(as_tuple=True)])


def test_left_padded_segments_give_each_row_its_own_causal_attention():
    """flash_prompt_attention's segments, emulated on the CPU: causal attention within each segment of the batch read
    as one sequence equals SDPA under the padding mask on every real position, and padding stays finite."""
    import torch

    from phi4_pron.fast.attention import left_padded_segments

    lengths, width = [4, 2, 3, 4], 4
    mask, real = _left_padded(lengths, width)
    segments = left_padded_segments(mask, len(lengths))
    assert segments.tolist() == [0, 0, 6, 9, 12, 16] and segments.dtype == torch.int32
    assert left_padded_segments(torch.ones(1, 1, 3, 3, dtype=torch.bool), 2).tolist() == [0, 0, 3, 6]
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(lengths), width, 2, 8) for _ in range(3))  # (batch, width, heads, dim)
    flat = [t.reshape(-1, 2, 8).transpose(0, 1) for t in (q, k, v)]  # (heads, tokens, dim)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(*(t[:, a:b] for t in flat), is_causal=True)
            for a, b in zip(segments[:-1].tolist(), segments[1:].tolist(), strict=True)
            if b > a
        ],
        dim=1,
    )
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    out = out.transpose(0, 1).reshape(len(lengths), width, 2, 8)
    torch.testing.assert_close(out[real], ref.transpose(1, 2)[real])
    assert torch.isfinite(out).all()


def test_a_decoding_step_reads_each_rows_own_positions_once_for_its_query_heads(monkeypatch):
    """flash_decode_attention over the head-major static cache, flash's variable-length kernel emulated on the CPU
    (segment i: query tokens query_offsets[i] to query_offsets[i + 1], key_counts[i] keys from key_offsets[i]): the
    packed SDPA's result under the padding mask, each row reading from its first prompt position to the current one."""
    import torch

    from phi4_pron.fast import attention

    batch, heads, kv_heads, length, dim = 3, 6, 2, 7, 8
    first, current = torch.tensor([0, 2, 4]), 5  # the rows' left padding; positions after 5 are empty
    pos = torch.arange(length)
    mask = ((pos[None] >= first[:, None]) & (pos[None] <= current))[:, None, None]
    offsets, counts = attention.decode_segments(mask, kv_heads)
    assert offsets.tolist() == [0, 7, 16, 23, 32, 39, 42] and counts.tolist() == [6, 6, 4, 4, 2, 2]
    assert offsets.dtype == counts.dtype == torch.int32

    def flash_varlen(q, k, v, q_offsets, k_offsets, max_q, max_k, dropout, causal, debug, scale, seqused_k):
        assert max_q == heads // kv_heads and max_k == length and not causal
        out = torch.empty_like(q)
        for i in range(len(q_offsets) - 1):
            a, b, start, n = q_offsets[i], q_offsets[i + 1], k_offsets[i], seqused_k[i]
            keys, values = k[start : start + n], v[start : start + n]
            attend = torch.nn.functional.scaled_dot_product_attention
            out[a:b] = attend(*(t.transpose(0, 1) for t in (q[a:b], keys, values)), scale=scale).transpose(0, 1)
        return (out,)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash_varlen)
    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, dim)
    k, v = (torch.randn(batch, kv_heads, length, dim) for _ in range(2))
    out, _ = attention.flash_decode_attention(None, q, k, v, mask, scaling=0.3)
    packed = torch.nn.functional.scaled_dot_product_attention(
        q.view(batch, kv_heads, heads // kv_heads, dim), k, v, attn_mask=mask, scale=0.3
    )
    assert out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out, packed.reshape(batch, heads, 1, dim).transpose(1, 2))
