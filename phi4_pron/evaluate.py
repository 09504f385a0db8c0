"""``python -m phi4_pron.evaluate run_dir=... [checkpoint=...]`` (or ``predictions=...``): a checkpoint on
the test split.

Composes the config, checks it, then runs :mod:`phi4_pron.jobs.evaluate`; heavy imports come only once the settings are
valid."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phi4_pron.config import EvaluateConfig, check_settings  # importing registers the schema before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    check_settings(cfg, EvaluateConfig)  # +key=value typos, values out of range: before any heavy import
    from phi4_pron.jobs.evaluate import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
