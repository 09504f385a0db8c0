"""One decoding step's attention at evaluation's batch shape, alone (no model): what shorter static caches and
FlexAttention's block-sparse decoding would save over what ``evaluate`` runs now (SDPA under the mask over the whole
head-major cache, the query heads packed onto their key/value heads: ``inference.sdpa_packed_decode``).

Rows are left-padded prompts of ``--width`` positions (the real lengths spread from half of it to all of it), at the
step ``--step`` of their answers, in a cache of ``--cache`` positions; times are per layer call. Needs torch alone
(the lent GPU machine runs it without the carried wheels).

    python scripts/decode_attention.py [--batch=256] [--width=576] [--step=12] [--cache=640]
"""

import json
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return 1000 * (time.perf_counter() - start) / repeat


def main(argv: list[str]) -> None:
    flags = {**dict(batch="256", width="576", step="12", cache="640"), **dict(a[2:].split("=", 1) for a in argv)}
    batch, width, step, cache = (int(flags[k]) for k in ("batch", "width", "step", "cache"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads, kv_heads, dim, now = 24, 8, 128, width + step
    torch.manual_seed(0)
    lengths = torch.randint(width // 2, width + 1, (batch,), device=device)
    lengths[0] = width
    pads = width - lengths
    q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, cache, dim, device=device, dtype=dtype) for _ in range(2))

    def packed(length: int):
        pos = torch.arange(length, device=device)
        mask = ((pos[None] >= pads[:, None]) & (pos[None] <= now))[:, None, None]
        kk, vv, qq = k[:, :, :length], v[:, :, :length], q.reshape(batch, kv_heads, heads // kv_heads, dim)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)

    rows = {
        "batch": batch,
        "width": width,
        "step": step,
        "cache": cache,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    rows["sdpa_whole_cache_ms"] = timed(packed(cache))
    rows["sdpa_cache_cut_to_the_step_ms"] = timed(packed(now + 1))  # what a cache exactly as long as needed reads
    reference = packed(cache)().reshape(batch, heads, 1, dim)

    def attends(b, h, q_idx, kv_idx):
        return (kv_idx >= pads[b]) & (kv_idx <= now)

    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(attends, batch, None, 1, cache, device=device)
    rows["flex_ms"] = timed(lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True))
    rows["flex_with_its_block_mask_ms"] = timed(
        lambda: compiled(
            q, k, v, block_mask=create_block_mask(attends, batch, None, 1, cache, device=device), enable_gqa=True
        )
    )
    rows["flex_max_abs_diff"] = (
        (compiled(q, k, v, block_mask=block_mask, enable_gqa=True) - reference).abs().max().item()
    )
    kv_bytes = 2 * batch * kv_heads * cache * dim * q.element_size()
    rows["whole_cache_read_ms_at_4.8TB/s"] = 1000 * kv_bytes / 4.8e12
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
