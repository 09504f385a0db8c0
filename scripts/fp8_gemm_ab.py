"""What FP8 could give the frozen language model: its linear layers' forward and input-gradient products, bf16
against float8 (e4m3, row-wise scales, activations quantised in each call, the frozen weights once), on a GPU.

    python scripts/fp8_gemm_ab.py [--tokens 6032] [--repeats 50]

Prints each layer's milliseconds and the epoch's projection (32 layers, 313 micro-batches of 16 samples of about
377 tokens): the least the frozen model's products take an epoch in bf16 and in float8. The float8 column includes
quantising the activations and the output gradients (compiled), not the weights (frozen: quantised once).
"""

import argparse

import torch

# Phi-4-mini's decoder linear layers: (name, out_features, in_features)
LAYERS = [("qkv_proj", 5120, 3072), ("o_proj", 3072, 3072), ("gate_up_proj", 16384, 3072), ("down_proj", 3072, 8192)]
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


@torch.compile
def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantised to e4m3 with one scale per row; returns (x8, scale) with x ~ x8 * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn over repeats, after a warmup."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(out_f: int, in_f: int, tokens: int, repeats: int) -> tuple[list[float], float]:
    """Milliseconds of (bf16 forward, bf16 input gradient, fp8 forward, fp8 input gradient) of one linear layer, and
    the fp8 forward's relative error."""
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16) * 1e-3
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * in_f**-0.5
    w8, w_scale = rowwise(w)  # [out, in], one scale per output row: the forward's operand
    wt8, wt_scale = rowwise(w.t().contiguous())  # [in, out], one scale per input column: the input gradient's

    def fwd_fp8():
        x8, xs = rowwise(x)
        return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=w_scale.t(), out_dtype=torch.bfloat16)

    def dgrad_fp8():
        g8, gs = rowwise(gy)
        return torch._scaled_mm(g8, wt8.t(), scale_a=gs, scale_b=wt_scale.t(), out_dtype=torch.bfloat16)

    ref = (x @ w.t()).float()
    err = ((fwd_fp8().float() - ref).norm() / ref.norm()).item()
    calls = (lambda: x @ w.t(), lambda: gy @ w, fwd_fp8, dgrad_fp8)
    return [timed(f, repeats) for f in calls], err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=6032)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=313)
    args = parser.parse_args()
    torch.manual_seed(0)
    total = {"bf16": 0.0, "fp8": 0.0}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens a micro-batch")
    print("| layer | bf16 fwd ms | bf16 dgrad ms | fp8 fwd ms | fp8 dgrad ms | fp8 rel. error fwd |")
    print("|---|---|---|---|---|---|")
    for name, out_f, in_f in LAYERS:
        row, err = measure(out_f, in_f, args.tokens, args.repeats)
        total["bf16"] += row[0] + row[1]
        total["fp8"] += row[2] + row[3]
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in row) + f" | {err:.4f} |")
    scale = args.layers * args.micro_batches / 1000
    print(f"epoch projection (products only): bf16 {total['bf16'] * scale:.1f} s, fp8 {total['fp8'] * scale:.1f} s")


if __name__ == "__main__":
    main()
