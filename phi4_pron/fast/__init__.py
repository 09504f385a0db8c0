"""The speed layer: everything here exists only to make training and generation faster, never to change a result.

Nothing runs at import. Each piece is switched on by an explicit call that the jobs make from the settings, and is
undone on exit, so the model and the libraries are left as they were found:

- :mod:`.attention`: flash attention for left-padded prompts and for decoding steps over a static cache
  (``hardware.attn_implementation=sdpa`` during generation), SDPA kept off cuDNN;
- :mod:`.generation`: ``generate`` with a reused static cache, the stop check one step late, audio read by the
  prefill only (:func:`.generation.fast_generation`; ``eval.compile``);
- :mod:`.prompt_blocks`: the prompts' norms, MLPs and rotary embedding compiled (a merged model, ``eval.compile``);
- :mod:`.layers`: decoder and audio layers compiled for training (``hardware.compile``), Unfreeze's audio layers
  recomputed in the backward (``hardware.checkpoint_audio_encoder``), Inductor's C++ wrapper
  (``hardware.compile_cpp_wrapper``), the compiler's caches in the run's cache folder.

``tests/test_fast.py`` checks each against the plain path on the CPU; ``tests/gpu/`` on a GPU (``make test-gpu``).
"""
