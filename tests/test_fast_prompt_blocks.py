"""phi4_pron.fast.prompt_blocks: the prompts' compiled norms, MLPs and rotary embedding compute what Phi-4's own
modules compute, and leave them as they were on exit."""

from __future__ import annotations


def test_prompt_blocks_compute_what_phi4s_modules_compute(tiny_model_dir):
    """compiled_prompt_blocks' RMSNorm and MLP are the modules' own functions; it leaves an unmerged LoRA model alone
    and CPU tensors (what it compiles runs on a GPU only) on the eager code; on exit every module and transformers'
    rotary embedding are the originals again."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

    from phi4_pron.fast import prompt_blocks
    from phi4_pron.modeling import load_base_model

    rotary = phi4_modeling.apply_rotary_pos_emb
    model = load_base_model(str(tiny_model_dir), None, torch.float32, "sdpa").eval()
    layer = model.model.layers[0]
    torch.manual_seed(0)
    h = torch.randn(2, 5, model.config.hidden_size)
    torch.testing.assert_close(
        prompt_blocks.rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
        layer.input_layernorm(h),
    )
    torch.testing.assert_close(
        prompt_blocks.gated_mlp(h, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight), layer.mlp(h)
    )
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["gate_up_proj"]))
    with prompt_blocks.compiled_prompt_blocks(lora) as n:
        assert n == 0 and phi4_modeling.apply_rotary_pos_emb is rotary
    model = lora.unload()
    n_layers = len(model.model.layers)
    with torch.inference_mode():
        before = layer.mlp(h)
        with prompt_blocks.compiled_prompt_blocks(model) as n:
            assert n == 1 + 3 * n_layers  # final norm, 2 norms and the MLP a layer
            assert "forward" in vars(layer.mlp) and phi4_modeling.apply_rotary_pos_emb is not rotary
            assert not prompt_blocks.is_prompt(h) and torch.equal(layer.mlp(h), before)
    assert phi4_modeling.apply_rotary_pos_emb is rotary
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_prompts_rotary_embedding_is_computed_token_major_and_handed_back_head_major(monkeypatch):
    """The prompts' rotary embedding (on a GPU, compiled) rotates the token-major tensors behind Phi-4's head-major
    views: the same values as transformers' function, in the same head-major shape, token-major in memory."""
    import torch
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4_modeling

    from phi4_pron.fast import prompt_blocks

    eager = phi4_modeling.apply_rotary_pos_emb  # transformers' function
    monkeypatch.setattr(prompt_blocks, "is_prompt", lambda hidden, seq_dim=1: True)
    monkeypatch.setattr(prompt_blocks, "_compiled", lambda fn: fn)
    torch.manual_seed(0)
    batch, tokens, heads, kv_heads, dim, rotary = 2, 5, 4, 2, 8, 6
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim)  # the attention's projection, token-major
    q = qkv[..., : heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim : (heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    for rows in (batch, 1):  # position ids a row, or one row for all
        cos, sin = torch.randn(2, rows, tokens, rotary)
        expected = eager(q, k, cos, sin)
        got = prompt_blocks._rotary(eager)(q, k, cos, sin)
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape and torch.equal(g, e)
            assert g.transpose(1, 2).is_contiguous()
