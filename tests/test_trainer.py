"""The trainer's fast paths (fused answer-only loss, compiled layers, cached audio embeddings) against the reference
loss and gradients, on the tiny model (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import task_questions
from omegaconf import OmegaConf

from phi4_pron.config import LORA_TARGET_MODULES as TARGETS


def _tiny_lora_model(tiny_model_dir):
    """The tiny model in fp32 with a fresh r8 LoRA, no dropout."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from phi4_pron.modeling import attach_speech_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = OmegaConf.create({"init": "fresh", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS})
    return attach_speech_lora(model, lora, path=str(tiny_model_dir))[0]


def _cpu_trainer(model, tiny_processing, mini_train, tmp_path, trainer_cls=None, rows=2, **args):
    """The framework's trainer (TRL's SFTTrainer, fused answer-only LM head), or ``trainer_cls``, on the CPU."""
    from trl import SFTConfig

    from phi4_pron.collator import PronunciationCollator
    from phi4_pron.trainer import PronunciationTrainer

    tokenizer, fe = tiny_processing
    config = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        **args,
    )
    return (trainer_cls or PronunciationTrainer)(
        model=model,
        args=config,
        train_dataset=mini_train.select(range(rows)),
        data_collator=PronunciationCollator(tokenizer, fe, task_questions("joint")),
        processing_class=tokenizer,
    )


def _batch(tiny_processing, mini_train):
    from phi4_pron.collator import PronunciationCollator

    return PronunciationCollator(*tiny_processing, task_questions("joint"))([mini_train[i] for i in range(4)])


def test_fused_answer_only_loss_equals_the_plain_loss(tiny_model_dir, tiny_processing, mini_train, tmp_path):
    """TRL's fused LM head (loss over answer positions only) gives the model's own full-logits loss."""
    model = _tiny_lora_model(tiny_model_dir).eval()
    batch = _batch(tiny_processing, mini_train)
    with torch.no_grad():
        reference = model(**batch).loss
    trainer = _cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    with torch.no_grad():
        fast = trainer.compute_loss(trainer.model, dict(batch))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)


def test_trainer_logs_what_trl_logs(tiny_model_dir, tiny_processing, mini_train, tmp_path):
    """PronunciationTrainer (metrics read at logging time) trains and logs exactly as TRL's SFTTrainer."""
    from trl import SFTTrainer

    from phi4_pron.trainer import PronunciationTrainer

    logged, flos = {}, {}
    for cls in (SFTTrainer, PronunciationTrainer):
        torch.manual_seed(0)
        model = _tiny_lora_model(tiny_model_dir)
        for name, p in model.named_parameters():  # B = 0 would leave the first step's loss unchanged by LoRA
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        trainer = _cpu_trainer(
            model,
            tiny_processing,
            mini_train,
            tmp_path / cls.__name__,
            trainer_cls=cls,
            rows=9,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=3,
            max_steps=3,
            logging_steps=1,
            learning_rate=1e-2,
            optim="sgd",  # not Adam, which lets rounding differences grow (see below)
            save_strategy="no",
        )
        trainer.train()
        logged[cls] = [h for h in trainer.state.log_history if "loss" in h]
        flos[cls] = trainer.state.total_flos
    reference, fast = logged[SFTTrainer], logged[PronunciationTrainer]
    assert len(reference) == len(fast) == 3
    for ref, got in zip(reference, fast, strict=True):
        assert got["num_tokens"] == ref["num_tokens"] > 0
        for key in ("loss", "entropy", "mean_token_accuracy", "grad_norm"):
            # Not bit for bit: TRL's forward gets the padding mask (another attention kernel) and sums in another
            # order; on an Intel Xeon the first step's grad_norm differed by 3e-4 relative. The differences grow with
            # each update: with SGD 0.2% and 0.4% in grad_norm at steps 2 and 3 there; with Adam (which divides each
            # update by its gradient's own magnitude) 4.7% at step 3. A real difference (a lost token, another loss
            # scale) changes the first step's values by far more than 1e-3. mean_token_accuracy counts argmax hits
            # among about 260 answer tokens a step: a near-tie flipped after an update moves it by 1/258.
            first_step = ref is reference[0]
            tolerance, slack = (1e-3, 0.0) if first_step else (2e-2, 0.01 if key == "mean_token_accuracy" else 0.0)
            assert got[key] == pytest.approx(ref[key], rel=tolerance, abs=slack), key
    assert fast[0]["num_tokens"] < fast[-1]["num_tokens"]  # counted across logging steps
    assert flos[PronunciationTrainer] == flos[SFTTrainer] > 0  # its parameter count taken once, the same estimate
    assert fast[0]["loss"] != fast[-1]["loss"]  # the steps trained


def test_a_training_step_trains_every_module_and_walks_the_model_only_when_one_is_not(
    tiny_model_dir, tiny_processing, mini_train, tmp_path
):
    """The Trainer sets training mode before every micro-batch; here only where a module is not training (an
    audio encoder left in eval mode, say), so that the next step trains it, and a step leaves no shortcut behind."""
    from phi4_pron.modeling import audio_encoder

    model = _tiny_lora_model(tiny_model_dir)
    trainer = _cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first step
    batch = _batch(tiny_processing, mini_train)
    leaf = next(m for m in model.modules() if not list(m.children()))
    walks = []

    def leaf_train(mode=True):  # the model's train() reaches every module: this one counts the walks
        walks.append(mode)
        leaf.training = mode
        return leaf

    leaf.train = leaf_train
    model.train()
    walks.clear()
    audio_encoder(model).eval()
    assert model.training and not audio_encoder(model).training
    trainer.training_step(trainer.model, dict(batch))
    assert walks == [True]
    assert all(m.training for m in model.modules() if m is not leaf)
    trainer.training_step(trainer.model, dict(batch))
    assert walks == [True]  # every module was training: no walk
    assert "train" not in vars(trainer.model)


@pytest.mark.parametrize("cpp_wrapper", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_layers_give_the_reference_loss_and_gradients(
    tiny_model_dir, tiny_processing, mini_train, tmp_path, cpp_wrapper
):
    """The fast training path (compiled layers + TRL's fused answer-only LM head) against the plain eager one, with
    Inductor's Python wrapper and with its C++ one (``hardware.compile_cpp_wrapper``, scoped as training scopes it)."""
    import numpy as np
    import torch._inductor.config as inductor_config

    from phi4_pron.modeling import compile_layers
    from phi4_pron.training import compile_settings

    model = _tiny_lora_model(tiny_model_dir).train()
    for name, p in model.named_parameters():  # B = 0 would hide a wrong LoRA path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(tiny_processing, mini_train)

    def loss_and_grads(fn):
        model.zero_grad()
        np.random.seed(0)  # the audio encoder draws its streaming-mask layout in training mode
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(lambda: model(**batch).loss)
    trainer = _cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    assert compile_layers(model) == 4  # the tiny model's 2 decoder and 2 audio conformer layers
    hardware = OmegaConf.create({"compile": True, "compile_cpp_wrapper": cpp_wrapper})
    with compile_settings(hardware):  # the layers compile at their first call, the backward's at the first backward
        assert inductor_config.cpp_wrapper is cpp_wrapper
        fast_loss, fast_grads = loss_and_grads(lambda: trainer.compute_loss(trainer.model, dict(batch)))
    assert inductor_config.cpp_wrapper is False  # scoped: later compiles (evaluation's) keep Inductor's default
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) == 16
    for name, g in ref_grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_compiled_decoder_layers_have_only_the_batch_and_its_length_as_symbols(
    tiny_model_dir, tiny_processing, mini_train
):
    """compile_layers' dynamic-shape decoder graphs see the rotary embedding's width (cos and sin's last size) as the
    constant it is (a symbolic width puts the rotary slices at offsets the kernels cannot prove aligned) and the batch
    and its length as symbols (so a new length compiles nothing)."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    from phi4_pron.modeling import compile_layers

    model = _tiny_lora_model(tiny_model_dir).train()
    compile_layers(model, audio=False)
    graphs = []

    def record(gm, example_inputs):  # Dynamo's graph, as Inductor would get it
        graphs.append({n.name: n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"})
        return gm.forward

    config = model.config
    for layer in model.get_base_model().model.layers:
        layer.compile(dynamic=True, backend=record)  # compile_layers' own setting, seen through the recorder
    model(**_batch(tiny_processing, mini_train), use_cache=False)

    assert graphs
    cos_sin = [v for g in graphs for k, v in g.items() if "position_embeddings" in k]
    hidden = [v for g in graphs for k, v in g.items() if k.endswith("args_0_")]
    assert len(cos_sin) == 2 * len(graphs) and len(hidden) == len(graphs)
    width = int(config.hidden_size // config.num_attention_heads * config.rope_parameters["partial_rotary_factor"])
    for t in cos_sin:
        assert not free_symbols(t.shape[-1]) and t.shape[-1] == width  # in this order: == would specialize a symbol
    for t in hidden:
        assert all(free_symbols(n) for n in t.shape[:2])  # batch and length


def test_compiled_audio_layers_take_any_audio_length_and_batch_with_the_reference_gradients(tiny_model_dir):
    """Unfreeze's audio conformer layers, compiled and recomputed in the backward as training runs them (the first
    recomputed, the last kept): the first batch compiles them, and later audio lengths and batch sizes compile
    nothing, nor does a backward in a thread of another intra-op thread count (as autograd's GPU device thread), and
    the encoder's output and every gradient are the eager encoder's. Each was a recompilation once: a new length
    (Inductor's lowering of the convolution's backward fixed it, until the convolution ran token-major), a new batch
    after a first one as large as the attention's head count (duck sizing gave both one symbol, and the attention
    fixed it), and the thread count (when the backward called the compiled forward again to recompute it). The
    compiled backward recomputes the layer itself: the backward enters no compiled region."""
    import threading

    import numpy as np
    from transformers import AutoModelForCausalLM

    from phi4_pron.modeling import TokenMajorConvModule, audio_encoder, checkpoint_audio_layers, compile_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    encoder = audio_encoder(model).requires_grad_(True)
    for p in encoder.parameters():  # the published zero-initialised biases would hide a wrong bias path
        torch.nn.init.normal_(p, std=0.05)
    size, heads = model.config.audio_config.input_size, model.config.audio_config.num_attention_heads

    def backward_in_a_thread_of_one(loss):
        errors = []

        def run_backward():
            torch.set_num_threads(1)
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(e)

        thread = threading.Thread(target=run_backward)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    def run_inputs(frames: int, batch: int):
        features = torch.randn(batch, frames, size, generator=torch.Generator().manual_seed(frames))
        mask = torch.ones(batch, frames, dtype=torch.bool)
        mask[-1, frames // 2 :] = False  # a shorter recording in the batch
        np.random.seed(0)  # the encoder draws its streaming-mask layout in training mode
        return features, mask

    def run(frames: int, batch: int, in_thread: bool = False):
        encoder.zero_grad()
        out = encoder(*run_inputs(frames, batch))
        loss = out.pow(2).mean()
        backward_in_a_thread_of_one(loss) if in_thread else loss.backward()
        return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}

    # 10, 17, 26, 7 frames after the encoder's 8x time reduction; the first batch is as large as the head count
    calls = [(80, heads), (136, 2), (208, 3, True), (56, 2)]
    ref = [run(*c) for c in calls]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # unlike the backward thread's 1, on any machine
    try:
        compile_layers(model)
        assert checkpoint_audio_layers(model, kept=1) == 1
        assert all(type(layer.conv) is TokenMajorConvModule for layer in encoder.encoders)
        fast = [run(*calls[0])]
        with torch.compiler.set_stance("fail_on_recompile"):  # raises at a recompilation
            fast += [run(*c) for c in calls[1:]]
            loss = encoder(*run_inputs(*calls[1][:2])).pow(2).mean()
            with torch.profiler.profile() as backward:
                loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert not [e.name for e in backward.events() if e.name.startswith("Torch-Compiled Region")]
    for (ref_out, ref_grads), (out, grads) in zip(ref, fast, strict=True):
        assert (out - ref_out).abs().max() <= 1e-4 * ref_out.abs().max()
        assert set(grads) == set(ref_grads)
        for name, g in ref_grads.items():
            assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_cached_audio_embeddings_give_the_reference_loss_and_gradients(
    tiny_model_dir, tiny_processing, mini_train, tmp_path
):
    """Training from the cached audio embeddings (``hardware.cache_audio_embeddings``) gives the loss and gradients
    of the audio encoder run in the step, when the table was computed from the same recordings."""
    import numpy as np

    from phi4_pron.audio_cache import AUDIO_ROWS, cache_audio_embeddings
    from phi4_pron.collator import PronunciationCollator

    model = _tiny_lora_model(tiny_model_dir).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    rows = mini_train.select([3, 0, 2, 1])
    plain = PronunciationCollator(*tiny_processing, task_questions("joint"))
    batch = plain([rows[i] for i in range(4)])

    def loss_and_grads(fn):
        model.zero_grad()
        np.random.seed(0)
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads(lambda: model(**batch).loss)
    cached_rows, collator, table = cache_audio_embeddings(model, rows, plain, batch_size=4)
    spans = cached_rows["audio_span"]
    assert [s for s, _ in spans] != sorted(s for s, _ in spans)  # computed longest first: the spans map back
    assert spans[max(range(4), key=lambda i: spans[i][1])][0] == 0  # the longest (most embeddings) first
    assert "audio" not in cached_rows.column_names and table.shape[0] == sum(n for _, n in spans)
    cached = collator([cached_rows[i] for i in range(4)])
    assert "audio_input_features" not in cached and cached[AUDIO_ROWS].shape == (table.shape[0],)
    assert torch.equal(cached["input_ids"], batch["input_ids"]) and torch.equal(cached["labels"], batch["labels"])
    trainer = _cpu_trainer(model, tiny_processing, mini_train, tmp_path)
    trainer.audio_table = table
    fast_loss, fast_grads = loss_and_grads(lambda: trainer.compute_loss(trainer.model, dict(cached)))
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(fast_grads) == set(ref_grads) and len(ref_grads) == 16
    for name, g in ref_grads.items():
        assert (fast_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name


def test_audio_embeddings_stay_uncached_where_training_mode_changes_them(tiny_model_dir, caplog):
    """Dropout or streaming chunks in the audio embedding make training mode differ: no cache, a warning."""
    from transformers import AutoConfig

    from phi4_pron.audio_cache import cache_audio_embeddings, unsupported_reason

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert unsupported_reason(config) is None
    config.audio_config.chunk_size = 18
    assert "chunk_size=18" in unsupported_reason(config)
    config.audio_config.chunk_size, config.embd_pdrop = -1, 0.1
    assert "embd_pdrop=0.1" in unsupported_reason(config)

    class Model:
        pass

    model = Model()
    model.config = config
    with caplog.at_level("WARNING"):
        assert cache_audio_embeddings(model, None, None, batch_size=4) is None
    assert "not cached" in caplog.text


def test_collator_asks_for_the_audio_span_column(tiny_processing, mini_train):
    from phi4_pron.collator import PronunciationCollator

    with pytest.raises(ValueError, match="audio_span.*cache_audio_embeddings"):
        PronunciationCollator(*tiny_processing, task_questions("joint"), audio_from_table=True)([mini_train[0]])


def test_unfreeze_trains_the_audio_encoder_in_float32_when_the_model_is_bf16(tiny_model_dir):
    """A bf16 model (the real checkpoint's dtype): PEFT keeps modules_to_save copies in bf16, where an Adam step of
    lr 2e-5 leaves most weights unchanged (rounded away); training's load_model gives them float32 master weights."""
    from conftest import compose

    from phi4_pron.training import load_model

    cfg = compose(["model=tiny", "model.dtype=bfloat16", "train_audio_encoder=true", "lora=r64"])
    model = load_model(cfg)[0]
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n: p for n, p in trained.items() if ".modules_to_save." in n}
    assert encoder and {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen model stays
    before = {n: p.detach().clone() for n, p in encoder.items()}
    for p in trained.values():
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(trained.values(), lr=2e-5, weight_decay=0.0).step()
    assert all(bool((p.detach() != before[n]).all()) for n, p in encoder.items())  # every element moved


def test_checkpointed_audio_encoder_gives_the_same_gradients(tiny_model_dir, tiny_processing, mini_train):
    """hardware.checkpoint_audio_encoder (Unfreeze at a larger batch): each audio layer runs again in the backward
    but the last hardware.audio_layers_kept, and the loss and every trained gradient are those of the kept
    activations."""
    import numpy as np
    from conftest import compose

    from phi4_pron.modeling import audio_encoder, checkpoint_audio_layers
    from phi4_pron.training import load_model

    cfg = compose(["model=tiny", "train_audio_encoder=true", "lora=r64", "lora.dropout=0.0"])
    model = load_model(cfg)[0].train()
    batch = _batch(tiny_processing, mini_train)
    layers = audio_encoder(model).encoders
    calls = []
    layers[0].feed_forward_in.register_forward_hook(lambda *_: calls.append("first"))
    layers[-1].feed_forward_in.register_forward_hook(lambda *_: calls.append("last"))

    def loss_and_gradients():
        calls.clear()
        model.zero_grad()
        np.random.seed(0)  # the encoder's streaming mask is random in training
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads, sorted(calls)

    loss, grads, runs = loss_and_gradients()
    assert checkpoint_audio_layers(model, kept=1) == len(layers) - 1
    loss_ckpt, grads_ckpt, runs_ckpt = loss_and_gradients()
    assert runs == ["first", "last"]
    assert runs_ckpt == ["first", "first", "last"]  # the first recomputed in the backward, the last kept
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert any(".modules_to_save." in n and g.abs().sum() > 0 for n, g in grads.items())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prepare_recomputes_unfreezes_compiled_audio_layers(tiny_model_dir):
    """The a100/h100 presets' Unfreeze: prepare() compiles the decoder and audio layers, and recomputes each audio
    layer but the last ``hardware.audio_layers_kept`` in the backward (a checkpoint inside its compiled region). The
    preset keeps 8 of Phi-4's 24; the tiny model has 2, so here it keeps 1."""
    from conftest import compose

    from phi4_pron.modeling import RecomputedConformerLayer, audio_encoder
    from phi4_pron.training import prepare

    assert compose(["hardware=h100"]).hardware.audio_layers_kept == 8
    overrides = ["model=tiny", "data=mini", "train_audio_encoder=true", "hardware=h100", "hardware.num_gpus=0"]
    cfg = compose(
        [*overrides, "hardware.audio_layers_kept=1", "data.max_train_samples=2", "hardware.dataloader_num_workers=0"]
    )
    assert cfg.hardware.checkpoint_audio_encoder and cfg.hardware.compile
    model = prepare(cfg).model
    first, last = audio_encoder(model).encoders
    assert type(first) is RecomputedConformerLayer and type(last) is not RecomputedConformerLayer
    assert first._compiled_call_impl is not None and last._compiled_call_impl is not None
    assert all(layer._compiled_call_impl for layer in model.get_base_model().model.layers)


def test_ddp_gradients_are_views_into_its_buckets(tiny_model_dir, tiny_processing, mini_train, tmp_path):
    """No second copy of the trainable gradients under DDP (2 GiB for Unfreeze's float32 encoder on a 24 GB card)."""
    trainer = _cpu_trainer(_tiny_lora_model(tiny_model_dir), tiny_processing, mini_train, tmp_path)
    assert trainer.accelerator.ddp_handler.gradient_as_bucket_view
