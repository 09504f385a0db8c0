"""Unfreeze's audio conformer as ``modeling.compile_layers`` compiles it (one region a layer, Inductor's C++ wrapper as
the a100/h100 presets set), its recomputed layers checkpointed in three ways; one variant a process:

- ``outside``: the checkpoint around each compiled layer's call (before commit 7480f5d), so the backward calls
  the compiled forward again;
- ``inside``: ``modeling.checkpoint_audio_layers`` now, the checkpoint inside each compiled layer's forward
  (``RecomputedConformerLayer``), so the compiled backward recomputes it;
- ``stack``: the 24 layers compiled as one region (the first layer's call runs them all), checkpoints inside.

The full-size audio encoder (random float32 weights, trained, bf16 autocast, the first 16 of its 24 layers recomputed
as the a100/h100 presets do) runs forward and backward over 12 micro-batches of 16 recordings (2-8 s, padded to the
longest), three times after two warm-up batches; timed alone, and with a stand-in for the language model after it (32
frozen bf16 blocks of Phi-4's decoder matrix shapes over 16 x 380 tokens, so that the host can run ahead of the GPU
as it does in training). Also: the first call's compile time, the peak memory, and the loss and gradient norm against
the same encoder uncompiled on one batch.

    python scripts/conformer_ab.py --variant=outside|inside|stack     (writes $OUT/conformer_ab-<variant>.json if OUT)
    python scripts/conformer_ab.py --variant=... --python-wrapper    (Inductor's Python wrapper instead of its C++ one)
    python scripts/conformer_ab.py --variant=... --tiny              (a check of the script on the CPU)
"""

import argparse
import functools
import json
import os
import time

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Phi4MultimodalAudioConfig
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

from phi4_pron.bench.measure import sync
from phi4_pron.modeling import TokenMajorConvModule, _with_static_heads, checkpoint_audio_layers, compile_layers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: --tiny, a check of the script
KEPT = 8  # conf/hardware/a100.yaml's audio_layers_kept
TOKENS, HIDDEN = 16 * 380, 3072


class Shell(nn.Module):
    """Just enough of Phi4MultimodalForCausalLM for ``compile_layers``: no decoder layers, the audio encoder."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        self.model.rotary_emb = nn.Identity()
        self.model.embed_tokens_extend = nn.Module()
        self.model.embed_tokens_extend.audio_embed = nn.Module()
        self.model.embed_tokens_extend.audio_embed.encoder = encoder

    def enable_input_require_grads(self) -> None:
        pass


def checkpoint_outside(encoder: nn.Module, kept: int) -> None:
    """The recomputed layers as ``checkpoint_audio_layers`` made them before commit 7480f5d."""

    def with_threads(threads, call, *args):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return call(*args)

    def recomputed(call, *args):
        return checkpoint(with_threads, torch.get_num_threads(), call, *args, use_reentrant=False)

    for layer in encoder.encoders[: len(encoder.encoders) - kept]:
        layer._compiled_call_impl = functools.partial(recomputed, layer._compiled_call_impl)


def compile_stack(encoder: nn.Module, recomputed: int) -> None:
    """The conformer's layers as one compiled region, run by the first layer's call; the others pass through."""
    layers = list(encoder.encoders)
    for layer in layers:
        layer.conv.__class__ = TokenMajorConvModule  # as compile_layers

    def stack(hidden_states, attention_mask):
        for i, layer in enumerate(layers):
            if i < recomputed:
                hidden_states = checkpoint(layer.forward, hidden_states, attention_mask, use_reentrant=False)
            else:
                hidden_states = layer.forward(hidden_states, attention_mask)
        return hidden_states

    layers[0]._compiled_call_impl = functools.partial(_with_static_heads, torch.compile(stack, dynamic=True))
    for layer in layers[1:]:
        layer._compiled_call_impl = lambda hidden_states, attention_mask: hidden_states


def batches(n: int = 12, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        frames = (rng.uniform(2, 8, size) * 100).astype(int)  # 10 ms feature frames
        mask = torch.arange(frames.max())[None, :] < torch.as_tensor(frames)[:, None]
        out.append((torch.randn(size, int(frames.max()), 80, device=DEVICE), mask.to(DEVICE)))
    return out


def decoder_stand_in(blocks: int = 32) -> list[torch.Tensor]:
    shapes = [(5120, HIDDEN), (HIDDEN, HIDDEN), (16384, HIDDEN), (HIDDEN, 8192)]
    return [torch.randn(s, device=DEVICE, dtype=torch.bfloat16) * 0.01 for _ in range(blocks) for s in shapes]


def step(encoder, up: nn.Linear, tokens: int, weights: list[torch.Tensor] | None, features, mask) -> torch.Tensor:
    np.random.seed(0)  # the encoder's streaming mask draws from NumPy in training
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        audio = encoder(features, mask)
        if weights is None:
            loss = audio.float().pow(2).mean()
        else:
            x = torch.ones(tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16) + up(audio).mean((0, 1))
            for qkv, o, gate_up, down in zip(*[iter(weights)] * 4, strict=True):
                x = x + (x @ qkv.T)[:, :HIDDEN] @ o.T
                g = x @ gate_up.T
                x = x + (nn.functional.silu(g[:, :8192]) * g[:, 8192:]) @ down.T
            loss = x.float().pow(2).mean()
    loss.backward()
    return loss.detach()


def grad_norm(module: nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))


def timed(call, data, rounds: int = 3) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        for features, mask in data:
            call(features, mask)
    sync()
    return (time.perf_counter() - start) / (rounds * len(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["outside", "inside", "stack"], required=True)
    parser.add_argument("--tiny", action="store_true", help="a 64-wide encoder and 2 short batches (CPU check)")
    parser.add_argument("--python-wrapper", action="store_true", help="Inductor's Python wrapper (the cpu preset's)")
    args = parser.parse_args()
    variant = args.variant
    torch.manual_seed(0)
    widths = ("hidden_size", "ext_pw_out_channel", "depthwise_separable_out_channel", "nemo_conv_channels")
    small = dict.fromkeys(widths, 64) | {"intermediate_size": 96, "num_attention_heads": 4} if args.tiny else {}
    encoder = Phi4MultimodalAudioModel(Phi4MultimodalAudioConfig(**small)).to(DEVICE).train()
    up = nn.Linear(encoder.config.hidden_size, HIDDEN).to(DEVICE)
    data, weights = (batches(4, 2), decoder_stand_in(1)) if args.tiny else (batches(), decoder_stand_in())
    tokens = 16 if args.tiny else TOKENS
    run = functools.partial(step, encoder, up, tokens)

    reference = run(None, *data[0]).item(), grad_norm(encoder).item()  # uncompiled
    encoder.zero_grad(set_to_none=True)
    shell = Shell(encoder)
    if DEVICE == "cuda" and not args.python_wrapper:
        torch._inductor.config.cpp_wrapper = True  # hardware.compile_cpp_wrapper, on in the a100/h100 presets
    if variant == "stack":
        compile_stack(encoder, recomputed=len(encoder.encoders) - KEPT)
    else:
        compile_layers(shell)
        if variant == "inside":
            checkpoint_audio_layers(shell, kept=KEPT)
        else:
            checkpoint_outside(encoder, kept=KEPT)
    start = time.perf_counter()
    compiled = run(None, *data[0]).item(), grad_norm(encoder).item()
    sync()
    compile_s = time.perf_counter() - start
    for features, mask in data[1:3]:  # two more lengths: a recompile would show here, not in the timing
        run(weights, features, mask)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    alone = timed(functools.partial(run, None), data)
    peak_alone = (torch.cuda.max_memory_allocated() / 2**30) if DEVICE == "cuda" else 0.0
    with_lm = timed(functools.partial(run, weights), data)

    def no_encoder(features, mask):
        return features.new_zeros(16, 1, encoder.config.hidden_size)

    lm_only = timed(functools.partial(step, no_encoder, up, tokens, weights), data)
    row = {
        "variant": variant,
        "wrapper": "python" if args.python_wrapper or DEVICE != "cuda" else "cpp",
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "first_call_s (compile)": round(compile_s, 1),
        "encoder_alone_ms": round(alone * 1e3, 1),
        "encoder_then_lm_stand_in_ms": round(with_lm * 1e3, 1),
        "lm_stand_in_only_ms": round(lm_only * 1e3, 1),
        "peak_gib_encoder_alone": round(peak_alone, 2),
        "loss_and_grad_norm_uncompiled": reference,
        "loss_and_grad_norm_compiled": compiled,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }
    print(json.dumps(row))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"conformer_ab-{variant}.json"), "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
