"""python -m pipeline.augment aug=<option> [data=…]: a PNG grid of what the augmentation does to training images."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.cli import hydra_command
from pipeline.config import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="augment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.cli import user_errors
    from pipeline.config import validate
    from pipeline.data.preview import save_augmentation_grid
    from pipeline.run import build_inputs

    with user_errors():
        validate(cfg)
        inputs = build_inputs(cfg)
        path = save_augmentation_grid(
            Path(cfg.preview.path),
            inputs.splits.train,
            cfg.preview.samples,
            cfg.aug.train,
            inputs.spec,
            views=cfg.preview.views,
            seed=cfg.seed,
            title=f"aug={cfg.aug.name} on {cfg.data.name}, input {inputs.spec.size[0]}x{inputs.spec.size[1]}",
        )
    print(path)


if __name__ == "__main__":
    hydra_command(main)
