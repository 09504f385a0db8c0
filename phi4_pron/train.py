"""Entrypoint: ``python -m phi4_pron.train [overrides]`` (``-m`` for sweeps). Composes the config and calls."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phi4_pron.config import TrainConfig, check_settings  # importing registers the schema before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    check_settings(cfg, TrainConfig)  # +key=value typos, values out of range: before any heavy import
    from phi4_pron.training import run_training  # heavy imports only once the config is valid

    run_training(cfg)


if __name__ == "__main__":
    main()
