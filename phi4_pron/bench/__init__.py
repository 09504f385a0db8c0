"""Speed and memory of the framework's own commands, on a full-size random-weight model (one GPU).

    python -m phi4_pron.bench train  --out experiments/benchmarks   # s/epoch: original recipe vs presets
    python -m phi4_pron.bench memory --out experiments/benchmarks   # peak GiB of every preset, longest audio
    python -m phi4_pron.bench eval   --out experiments/benchmarks   # s for the test split, original vs preset
    python -m phi4_pron.bench check  --out experiments/benchmarks   # fast path vs original recipe: same training?
    python -m phi4_pron.bench floor  --out experiments/benchmarks   # the LM alone over an epoch's batches: the floor
    python -m phi4_pron.bench job    --out experiments/benchmarks   # the main job's shape end to end, projected
    python -m phi4_pron.bench train --tiny --only h100-r64            # the same code on the tiny model (CPU)

Rows are `python -m phi4_pron.train` / `evaluate` commands, composed by Hydra from ``conf/`` with the overrides in
``conf/bench/<mode>.yaml`` and run in this process through ``jobs.train.run_training`` or
``jobs.evaluate.run_evaluation``
(:mod:`phi4_pron.bench.measure`); each printed row carries its command. The model and corpus they name are the
stand-ins of :mod:`phi4_pron.bench.stand_in`, built under ``--root`` on first use.
"""
