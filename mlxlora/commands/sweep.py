"""`mlxlora sweep`: measure the best LoRA learning rate and batch size with short runs."""

import logging
from pathlib import Path

import click

from mlxlora.commands.options import config_options
from mlxlora.config import FIELDS, resolve_config
from mlxlora.sweep_grid import DEFAULT_STEPS, TRAIN_ONLY_FIELDS

logger = logging.getLogger("mlxlora")

SWEEP_FIELDS = [name for name in FIELDS if name not in TRAIN_ONLY_FIELDS]


@click.command("sweep")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="YAML file of train options; flags given here override it.")
@click.option("--lrs", default=None,
              help="Learning rates to try: START:STOP:COUNT for COUNT log-spaced values "
                   "(1e-5:1e-2:7) or a comma list (1e-4,3e-4,1e-3). Default: 5 values from "
                   "1/10 to 10x the LoRA default for this model, or of --learning-rate.")
@click.option("--batch-sizes", default=None,
              help="Comma list of batch sizes to try. Default: --batch-size.")
@click.option("--ranks", default=None,
              help="Comma list of LoRA ranks to try. Default: --rank.")
@click.option("--steps", type=int, default=None,
              help="Optimizer steps per point at the smallest batch size; larger batch sizes "
                   "take proportionally fewer, so every point sees the same examples.  "
                   f"[default: {DEFAULT_STEPS}]")
@click.option("--examples", type=int, default=None,
              help="Training examples per point, instead of --steps.")
@click.option("--evals", type=int, default=1, show_default=True,
              help="Validation evaluations per point, evenly spaced; the last one scores it.")
@click.option("--output", type=click.Path(file_okay=False), default="sweep", show_default=True,
              help="Folder for sweep.json and sweep.png. A sweep started there with the same "
                   "settings resumes from its finished points.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Discard the results already in --output.")
@config_options(SWEEP_FIELDS)
def command(recipe, lrs, batch_sizes, ranks, steps, examples, evals, output, overwrite,
            **flags) -> None:
    """Compare learning rates, batch sizes and ranks with short LoRA runs.

    Each grid point trains from the same initial adapter on the same examples in the same
    order and is scored by validation loss after the same number of examples (a held-out
    tenth of train when there is no valid.jsonl). Diverged points are stopped early.
    Prints a table and the `mlxlora train` command for the best point, and writes
    sweep.json and sweep.png to --output.
    """
    from mlxlora.errors import ConfigError
    from mlxlora.sweep import SweepOptions, report_lines, run_sweep
    from mlxlora.sweep_grid import parse_integers, parse_learning_rates

    if evals < 1:
        raise ConfigError(f"--evals must be at least 1, got {evals}")
    options = SweepOptions(
        output=Path(output),
        learning_rates=parse_learning_rates(lrs) if lrs else None,
        batch_sizes=parse_integers(batch_sizes, "--batch-sizes") if batch_sizes else None,
        ranks=parse_integers(ranks, "--ranks") if ranks else None,
        steps=steps, examples=examples, evals=evals, overwrite=overwrite, recipe=recipe,
        flags={name: value for name, value in flags.items() if value is not None})
    resolved = resolve_config(recipe, flags)

    try:
        result = run_sweep(resolved, options)
    except KeyboardInterrupt:
        logger.warning("sweep interrupted; the finished points are in %s. Run the same "
                       "command again to resume.", options.output / "sweep.json")
        raise

    click.echo("\n".join(report_lines(result)))
    click.echo(f"\nWrote {options.output / 'sweep.json'} and {options.output / 'sweep.png'}")
