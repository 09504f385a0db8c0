"""``python -m phi4_pron.train [overrides]`` (``-m`` for sweeps): train one configuration.

Composes the config, checks it, then runs :mod:`phi4_pron.jobs.train`; heavy imports come only once the settings are
valid."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phi4_pron.config import TrainConfig, check_settings  # importing registers the schema before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    check_settings(cfg, TrainConfig)  # +key=value typos, values out of range: before any heavy import
    from phi4_pron.jobs.train import run_training

    run_training(cfg)


if __name__ == "__main__":
    main()
