"""A merged model's prompts (several tokens a row, no autograd, on a GPU) through three compiled graphs shared by all
layers: RMSNorm, the gated MLP and the rotary embedding; one-token decoding steps keep the eager code, which
transformers compiles whole with a static cache. Inside :func:`compiled_prompt_blocks` only."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

from phi4_pron.fast.layers import mark_sizes_static


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi-4's RMSNorm (``Phi4MultimodalRMSNorm``: float32 inside)."""
    x = hidden.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def gated_mlp(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Phi-4's MLP (``Phi4MultimodalMLP``, SiLU): ``down(up * silu(gate))``."""
    gate, up = torch.nn.functional.linear(hidden, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(up * torch.nn.functional.silu(gate), down)


@functools.cache
def _compiled(fn):
    """One dynamic-shape graph per function, compiled on first use and shared by every layer."""
    return torch.compile(fn, dynamic=True)


def is_prompt(hidden: torch.Tensor, seq_dim: int = 1) -> bool:
    """Several tokens a row, on a GPU, without autograd (so never in training): what runs compiled."""
    return hidden.shape[seq_dim] > 1 and hidden.is_cuda and not torch.is_grad_enabled()


def _rotary(eager):
    def prompt_rotary(q, k, cos, sin, unsqueeze_dim=1):
        """transformers' rotary embedding, compiled for prompts and computed token-major: rotated as the head-major
        views they are, the compiled kernel writes a transposed copy. Handed back as the same head-major views."""
        if not is_prompt(q, seq_dim=2) or unsqueeze_dim != 1:
            return eager(q, k, cos, sin, unsqueeze_dim)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        mark_sizes_static(q, k, cos, sin)
        q, k = _compiled(eager)(q, k, cos, sin, 2)
        return q.transpose(1, 2), k.transpose(1, 2)

    return prompt_rotary


def _prompt_norm(norm):
    eager = norm.forward
    return lambda h: _compiled(rms_norm)(h, norm.weight, norm.variance_epsilon) if is_prompt(h) else eager(h)


def _prompt_mlp(mlp):
    eager = mlp.forward
    return lambda h: (
        _compiled(gated_mlp)(h, mlp.gate_up_proj.weight, mlp.down_proj.weight) if is_prompt(h) else eager(h)
    )


@contextlib.contextmanager
def compiled_prompt_blocks(model) -> Iterator[int]:
    """Inside, prompts run every RMSNorm and MLP of the decoder and the rotary embedding compiled; yields how many
    modules do (0: left as they are, not Phi-4's SiLU MLP or LoRA layers not merged). The decoder layers themselves
    cannot be compiled for prompts as one graph: each indexes the cache by its number."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    mlps = [layer.mlp for layer in decoder.layers]
    plain = all(type(m.gate_up_proj) is type(m.down_proj) is torch.nn.Linear for m in mlps)
    if decoder.config.hidden_act != "silu" or not plain:
        yield 0
        return
    norms = [decoder.norm] + [
        m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    eager_rotary = phi4_modeling.apply_rotary_pos_emb
    for norm in norms:
        norm.forward = _prompt_norm(norm)
    for mlp in mlps:
        mlp.forward = _prompt_mlp(mlp)
    phi4_modeling.apply_rotary_pos_emb = _rotary(eager_rotary)
    try:
        yield len(norms) + len(mlps)
    finally:
        phi4_modeling.apply_rotary_pos_emb = eager_rotary
        for module in [*norms, *mlps]:
            del module.forward  # the class's forward again
