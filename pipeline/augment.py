"""python -m pipeline.augment aug=<option> [data=…]: a PNG grid of what the augmentation does to training images."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError


@hydra.main(config_path=str(CONF_DIR), config_name="augment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.config import validate
    from pipeline.data.preview import save_augmentation_grid
    from pipeline.run import build_inputs

    try:
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
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
