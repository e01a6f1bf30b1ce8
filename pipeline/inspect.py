"""python -m pipeline.inspect: what a model is and costs, its feature pyramid, or which models exist.

python -m pipeline.inspect model=classic_resnet50 [data=…] [inspect.depth=1]
python -m pipeline.inspect model=classic_resnet50 inspect.features=true
python -m pipeline.inspect --list ['*resnet*']
"""

from __future__ import annotations

import fnmatch
import sys

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from pipeline.cli import hydra_command, user_errors
from pipeline.config import CONF_DIR
from pipeline.errors import UserInputError


def list_models(pattern: str = "*") -> None:
    """Every model name the factory builds; ours (written from the papers) first and marked."""
    import timm

    import pipeline.models  # noqa: F401  (registers ours)

    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, pattern)]
    ours = [n for n in names if timm.models.model_entrypoint(n).__module__.startswith("pipeline.models")]
    console = Console(soft_wrap=True)
    console.print(f"[bold]ours[/bold] ({len(ours)}): " + ", ".join(ours))
    console.print(f"[bold]timm[/bold] ({len(names) - len(ours)}): " + ", ".join(n for n in names if n not in ours))
    console.print("Use one with model=<conf file> or model=timm model.name=<name>.")


def show(cfg: DictConfig) -> None:
    from pipeline.config import validate
    from pipeline.models.stats import count_flops, count_parameters, layer_costs
    from pipeline.run import build_inputs

    validate(cfg)
    inputs = build_inputs(cfg)
    shape = (inputs.spec.channels, *inputs.spec.size)
    if cfg.inspect.features:
        show_features(cfg.model.name, inputs.model, shape)
        return
    table = Table(title=f"{cfg.model.name}: input {shape}, {inputs.splits.num_classes} classes")
    for column in ("layer", "type", "output shape", "params", "MFLOPs"):
        table.add_column(column, justify="left" if column in ("layer", "type") else "right")
    for row in layer_costs(inputs.model, shape, cfg.inspect.depth):
        indent = "  " * row.name.count(".")
        table.add_row(indent + row.name, row.kind, str(row.output_shape), f"{row.params:,}", f"{row.flops / 1e6:,.2f}")
    total, trainable = count_parameters(inputs.model)
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"parameters: {total:,} ({trainable:,} trainable)")
    console.print(f"FLOPs per image: {count_flops(inputs.model, shape) / 1e9:,.4f} G (a multiply-add = 2 FLOPs)")


def show_features(name: str, model: object, shape: tuple[int, int, int]) -> None:
    """The feature pyramid: what features_only=True, out_indices and forward_intermediates give, level by level."""
    from pipeline.models.stats import feature_pyramid

    if not hasattr(model, "feature_info") or not hasattr(model, "forward_intermediates"):
        raise UserInputError(
            f"inspect.features=true: {name} has no feature_info / forward_intermediates (timm's feature contract), "
            "so it has no feature pyramid to show. Inspect its layers instead: inspect.features=false."
        )
    table = Table(title=f"{name}: feature pyramid at input {shape}")
    for column in ("stage", "module", "channels", "stride", "output shape"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for level in feature_pyramid(model, shape):
        table.add_row(str(level.index), level.module, str(level.channels), str(level.stride), str(level.output_shape))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"timm.create_model('{name}', features_only=True, out_indices=(…)) returns these levels.")


@hydra.main(config_path=str(CONF_DIR), config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        show(cfg)


if __name__ == "__main__":
    if "--list" in sys.argv:
        arguments = sys.argv[sys.argv.index("--list") + 1 :]
        list_models(arguments[0] if arguments else "*")
    else:
        hydra_command(main)
