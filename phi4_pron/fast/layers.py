"""Training's compiled layers: each decoder layer and each trained audio conformer layer compiled in place
(``hardware.compile``), Unfreeze's audio layers recomputed in the backward (``hardware.checkpoint_audio_encoder``),
Inductor's settings and caches for them. These change the model instance only; :func:`compile_settings` scopes the
compiler's settings to the job."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
    Phi4MultimodalAudioConformerEncoderLayer,
    Phi4MultimodalAudioConvModule,
)

from phi4_pron.modeling import audio_encoder


def mark_sizes_static(*tensors: torch.Tensor) -> None:
    """A graph compiled with dynamic shapes takes each (batch, tokens, ...) tensor's sizes after the first two as the
    constants they are. Else the rotary embedding's width (96 of Phi-4's 128 head dims) is a symbol, its slices start
    at symbolic offsets, and the compiled kernels cannot prove them aligned."""
    for t in tensors:
        for dim in range(2, t.dim()):
            torch._dynamo.mark_static(t, dim)


class TokenMajorConvModule(Phi4MultimodalAudioConvModule):
    """Phi-4's conformer convolution module computed on (batch, time, channels): its 1x1 convolutions as matrix
    products and its causal depthwise convolution as the sum of ``kernel_size`` shifted products. The same arithmetic
    and parameters, but no convolution for Inductor to lower: its convolution backward fixes the time length as a
    constant, so every new audio length would recompile the layer."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        glu, dw, pw, out_conv = self.glu, self.dw_sep_conv_1d.dw_conv, self.dw_sep_conv_1d.pw_conv, self.ext_pw_conv_1d
        linear = torch.nn.functional.linear
        h = linear(self.layer_norm(hidden_states), glu.ext_pw_conv_1d.weight[..., 0], glu.ext_pw_conv_1d.bias)
        d = glu.output_dim
        h = (h[..., :d] + glu.b1[0, :, 0]) * glu.glu_act(h[..., d : 2 * d] + glu.b2[0, :, 0])
        k, steps = dw.kernel_size[0], h.shape[1]
        weight = dw.weight[:, 0, :].to(h.dtype)  # (channels, k): output t sees inputs t-k+1 .. t
        padded = torch.nn.functional.pad(h, (0, 0, k - 1, 0))
        h = sum(padded[:, j : j + steps] * weight[:, j] for j in range(k)) + dw.bias.to(h.dtype)
        h = linear(h, pw.weight[..., 0], pw.bias)
        return self.dropout(linear(self.act(h), out_conv.weight[..., 0], out_conv.bias))


class RecomputedConformerLayer(Phi4MultimodalAudioConformerEncoderLayer):
    """A conformer layer checkpointed from inside its forward: the same parameters and outputs, its activations
    recomputed in the backward. Compiled, the checkpoint is part of the compiled region, whose backward recomputes the
    forward itself (from outside, the backward would call the compiled forward again through Dynamo's guards: host
    time a step). One class, so the recomputed layers share their graphs. The layers have no dropout, so the
    recomputation is exact."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        forward = Phi4MultimodalAudioConformerEncoderLayer.forward
        return checkpoint(forward, self, hidden_states, attention_mask, use_reentrant=False)


def compile_layers(model, audio: bool = True) -> int:
    """Compile each decoder layer and (``audio``) each audio conformer layer in place; returns how many.

    The decoder layers share one graph, the audio layers one for each of their classes (kept and
    :class:`RecomputedConformerLayer`), compiled with dynamic shapes at the first step, so no later batch length
    recompiles them (batches are padded to a multiple of 8, so their alignment never changes either); only the batch
    and its length are symbols (:func:`mark_sizes_static`). The conformer layers' convolutions run token-major
    (:class:`TokenMajorConvModule`). The input embeddings require grad, so that the first layer's input is of the
    same kind as the others'. Parameter names, checkpoints and the saved adapter are unchanged.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.enable_input_require_grads()
    base.model.rotary_emb.register_forward_hook(lambda _module, _args, cos_sin: mark_sizes_static(*cos_sin))
    conformers = list(audio_encoder(model).encoders) if audio else []
    for layer in conformers:
        dw = layer.conv.dw_sep_conv_1d.dw_conv  # token-major needs one filter a channel (depthwise_multiplier 1)
        if dw.groups == dw.in_channels == dw.out_channels:  # as published
            layer.conv.__class__ = TokenMajorConvModule
    for layer in [*base.model.layers, *conformers]:
        layer.compile(dynamic=True)
    for layer in conformers:
        layer._compiled_call_impl = functools.partial(_with_static_heads, layer._compiled_call_impl)
    return len(base.model.layers) + len(conformers)


def _with_static_heads(call, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A compiled conformer layer's call, its (batch, heads, time, time) mask's head count static: else a batch as
    large as the head count (16) shares the heads' symbol, the attention's broadcast fixes the batch, and a smaller
    last micro-batch recompiles every conformer graph."""
    torch._dynamo.mark_static(attention_mask, 1)
    return call(hidden_states, attention_mask)


@contextlib.contextmanager
def uncompiled(model) -> Iterator[None]:
    """The layers :func:`compile_layers` compiled run their plain forward while inside (generation in the middle of
    training): their training graphs are neither recompiled for inference nor dropped."""
    layers = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    calls = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield
    finally:
        for layer, call in zip(layers, calls, strict=True):
            layer._compiled_call_impl = call


def checkpoint_audio_layers(model, kept: int = 0) -> int:
    """Recompute each audio conformer layer's activations in the backward (Unfreeze's trained encoder; transformers
    checkpoints only the decoder layers), all but the last ``kept`` layers; returns how many."""
    layers = audio_encoder(model).encoders
    recomputed = layers[: max(len(layers) - kept, 0)]
    for layer in recomputed:
        layer.__class__ = RecomputedConformerLayer
    return len(recomputed)


def cpp_compiler(hw) -> str | None:
    """The C++ compiler that builds the compiled layers' kernel launchers (``hardware.compile_cpp_wrapper``), None
    where the settings use none; a clear error where none is found."""
    if not (hw.compile and hw.compile_cpp_wrapper):
        return None
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise RuntimeError(
            f"hardware.compile_cpp_wrapper=true builds the compiled layers' kernel launchers with a C++ compiler: {e}. "
            "Install g++ (apt-get install g++, or conda install gxx), name another with the CXX environment "
            "variable, or train with hardware.compile_cpp_wrapper=false (Inductor's Python wrapper, slower steps)."
        ) from e


def compile_settings(hw) -> contextlib.AbstractContextManager:
    """Inductor's settings for the layers training compiles, for ``trainer.train`` only (generation in the middle of
    it takes the defaults): the C++ wrapper where ``hardware.compile_cpp_wrapper`` (its compiler looked for here)."""
    if cpp_compiler(hw) is None:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(cpp_wrapper=True)


@contextlib.contextmanager
def compiler_caches(hw, cache_dir: str | Path) -> Iterator[None]:
    """The compiler's caches under ``cache_dir`` for the job (unless ``TORCHINDUCTOR_CACHE_DIR`` names a folder), so
    a second run and the later jobs of a sweep reuse what the first compiled. The default, a folder of /tmp, is often
    private to each job on a cluster."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not hw.compile or before not in (None, default_cache_dir()):  # (torch writes its default there once asked)
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser() / "torch_compile")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
