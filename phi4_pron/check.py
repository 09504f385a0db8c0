"""``python -m phi4_pron.check [train overrides]``: a pre-flight with the real files (exit 1 if a step
fails).

Composes the config, checks it, then runs :mod:`phi4_pron.jobs.check`; heavy imports come only once the settings are
valid."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from phi4_pron.config import TrainConfig, check_settings  # importing registers the schema before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    check_settings(cfg, TrainConfig)  # +key=value typos, values out of range: before any heavy import
    from phi4_pron.jobs.check import run_check

    if not run_check(cfg):
        sys.exit(1)


if __name__ == "__main__":
    main()
