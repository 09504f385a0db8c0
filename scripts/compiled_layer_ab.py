"""Two changes to the compiled layers, each A/B in one process: the rotary embedding's width as a symbol or as a
constant in the dynamic-shape graphs, and the audio conformer's convolution module by cuDNN or token-major.

- ``layer``: one full-size Phi-4 decoder layer (random bf16 weights, frozen, gradients to its input), compiled as
  ``compile_layers`` compiles it, forward and backward at a training micro-batch (16 x 384 tokens);
- ``prompt``: evaluation's compiled rotary embedding (``inference._compiled_rotary``) on an APA prefill batch
  (256 x 600 tokens, token-major views of the projection, as ``inference._prompt_rotary`` hands them);
- ``conformer``: one full-size audio conformer layer as Unfreeze trains it (float32 weights under bf16 autocast,
  compiled, recomputed in the backward), forward and backward at 16 recordings x 64 frames, its convolution module
  as transformers runs it (cuDNN) or token-major (``modeling.TokenMajorConvModule``: no gain at one length on
  2026-12-03; landed later that day because it keeps the compiled layers from recompiling at each audio length).

Each variant in the order before, after, before again (a drift check), after ``torch._dynamo.reset()``; timed by
CUDA events over ``--iters`` calls after warm-up calls at two lengths; then the variant's five longest GPU kernels.

    python scripts/compiled_layer_ab.py [--iters=N]      (writes $OUT/compiled_layer_ab.json when OUT is set)
    python scripts/compiled_layer_ab.py --conv-check     (CPU: the token-major module against transformers' forward)
"""

import functools
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import Phi4MultimodalConfig
from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4

from phi4_pron import inference
from phi4_pron.modeling import TokenMajorConvModule, mark_sizes_static

CONFIG = Phi4MultimodalConfig(  # Phi-4-multimodal-instruct's sizes, as phi4_pron.bench.stand_in.full_config
    num_attention_heads=24,
    num_key_value_heads=8,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
)
CONFIG._attn_implementation = "sdpa"


def timed(step, iters: int) -> tuple[float, list]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: -e.self_device_time_total,
    )
    top = [(e.key[:90], round(e.self_device_time_total / 1e3, 3)) for e in kernels[:5]]
    return start.elapsed_time(end) / iters, top


def layer_case(static: bool, iters: int) -> dict:
    layer = phi4.Phi4MultimodalDecoderLayer(CONFIG, 0).cuda().to(torch.bfloat16).train().requires_grad_(False)
    rotary = phi4.Phi4MultimodalRotaryEmbedding(CONFIG).cuda()
    layer.compile(dynamic=True)

    def inputs(tokens: int):
        x = torch.randn(16, tokens, CONFIG.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rotary(x, torch.arange(tokens, device="cuda")[None])
        if static:
            mark_sizes_static(cos, sin)
        return x, (cos, sin)

    for tokens in (376, 384):  # two lengths: the graph's sizes as training's second step leaves them
        x, cos_sin = inputs(tokens)
        layer(x, position_embeddings=cos_sin).sum().backward()
    x, cos_sin = inputs(384)
    grad = torch.randn_like(x)

    def step():
        layer(x, position_embeddings=cos_sin).backward(grad)

    ms, top = timed(step, iters)
    return {"case": "layer fwd+bwd, 16 x 384", "static": static, "ms": ms, "top_kernels_ms": top}


def prompt_case(static: bool, iters: int) -> dict:
    heads, kv, dim = CONFIG.num_attention_heads, CONFIG.num_key_value_heads, CONFIG.hidden_size // 24
    rotary = phi4.Phi4MultimodalRotaryEmbedding(CONFIG).cuda()

    def inputs(tokens: int):
        qkv = torch.randn(256, tokens, (heads + 2 * kv) * dim, device="cuda", dtype=torch.bfloat16)
        q = qkv[..., : heads * dim].view(256, tokens, heads, dim)
        k = qkv[..., heads * dim : (heads + kv) * dim].view(256, tokens, kv, dim)
        cos, sin = rotary(qkv, torch.arange(tokens, device="cuda")[None].expand(256, -1))
        if static:
            mark_sizes_static(q, k, cos, sin)
        return q, k, cos, sin

    with torch.no_grad():
        for tokens in (592, 600):
            inference._compiled_rotary(*inputs(tokens), 2)
        args = inputs(600)
        ms, top = timed(lambda: inference._compiled_rotary(*args, 2), iters)
    return {"case": "prompt rotary, 256 x 600", "static": static, "ms": ms, "top_kernels_ms": top}


def conformer_case(token_major: bool, iters: int) -> dict:
    from torch.utils.checkpoint import checkpoint

    audio = CONFIG.audio_config
    layer = phi4.Phi4MultimodalAudioConformerEncoderLayer(audio).cuda().train()
    if token_major:
        layer.conv.__class__ = TokenMajorConvModule
    layer.compile(dynamic=True)
    heads = audio.num_attention_heads

    def inputs(frames: int):
        x = torch.randn(16, frames, audio.hidden_size, device="cuda", requires_grad=True)
        return x, torch.zeros(16, heads, frames, frames, device="cuda")

    def fwd_bwd(x, mask):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = checkpoint(layer, x, mask, use_reentrant=False)
        out.float().sum().backward()

    for frames in (56, 64):
        fwd_bwd(*inputs(frames))
    args = inputs(64)
    ms, top = timed(lambda: fwd_bwd(*args), iters)
    return {"case": "conformer fwd+bwd, 16 x 64", "token_major": token_major, "ms": ms, "top_kernels_ms": top}


def conv_check() -> None:
    """The token-major convolution module's output and gradients against transformers' forward (float32)."""
    torch.manual_seed(0)
    module = phi4.Phi4MultimodalAudioConvModule(CONFIG.audio_config).eval()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 37, CONFIG.audio_config.hidden_size, requires_grad=True)
    results = []
    for forward in (module, functools.partial(TokenMajorConvModule.forward, module)):
        module.zero_grad()
        x.grad = None
        out = forward(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append(
            (out.detach(), {"x": x.grad.clone()} | {n: p.grad.clone() for n, p in module.named_parameters()})
        )
    (ref, ref_grads), (out, grads) = results
    rel = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items() if g.norm() > 0)
    print(
        f"output: largest difference {(out - ref).abs().max().item():.2e} (largest value {ref.abs().max().item():.2f})"
    )
    print(f"gradients: largest relative difference {rel:.2e}")


def main() -> None:
    if "--conv-check" in sys.argv:
        return conv_check()
    iters = int(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--iters=")), 20))
    results = []
    for case in (conformer_case, layer_case, prompt_case):
        for after in (False, True, False):
            torch._dynamo.reset()
            results.append(case(after, iters))
            print(json.dumps(results[-1]), flush=True)
            if os.environ.get("OUT"):
                meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
                with open(os.path.join(os.environ["OUT"], "compiled_layer_ab.json"), "w") as f:
                    json.dump({**meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
