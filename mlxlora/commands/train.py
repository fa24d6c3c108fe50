"""`mlxlora train`: fine-tune a LoRA adapter."""

import click

from mlxlora.commands.options import config_options
from mlxlora.config import require_data, resolve_config
from mlxlora.data_formats import find_splits


@click.command("train")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="YAML file of config values; flags given here override it.")
@config_options()
def command(recipe: str | None, **flags) -> None:
    """Train a LoRA adapter on a JSONL dataset.

    Values come from the built-in defaults, then --recipe, then these flags. The resolved
    config and the source of every value are logged and saved in the output folder.
    """
    from mlxlora.trainer import train

    resolved = resolve_config(recipe, flags)
    if not resolved.config.resume:
        # A resumed run takes its data from the checkpoint's config. Finding the files now
        # reports a wrong path before the model loads and before the output folder exists.
        require_data(resolved.config)
        find_splits(resolved.config.data)
    train(resolved)
