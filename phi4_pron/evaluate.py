"""Entrypoint: ``python -m phi4_pron.evaluate run_dir=... [checkpoint=...]`` or ``predictions=...``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from phi4_pron import config as _config  # noqa: F401  (registers the schema before Hydra composes)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from phi4_pron.eval_job import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    main()
