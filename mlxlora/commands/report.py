"""`mlxlora report`: rebuild a run's report.md and loss.png, or compare runs."""

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--compare", "compare", multiple=True, type=click.Path(file_okay=False),
              metavar="DIR",
              help="Another run folder to overlay; repeat for more. Writes compare.md and "
                   "compare.png instead of report.md and loss.png.")
@click.option("--output", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder for the written files.  [default: RUN_DIR]")
def command(run_dir: str, compare: tuple[str, ...], output: str | None) -> None:
    """Write the report of the training run in RUN_DIR (its --adapter-path folder).

    The report shows the train and validation loss curves, the learning-rate schedule,
    tokens/s, peak memory, the settings that matter most for LoRA, a data summary and
    warnings. Training writes it on its own at the end; this command rebuilds it, for
    example for a stopped run.
    """
    from mlxlora.report_checks import find_warnings
    from mlxlora.run_facts import load_run
    from mlxlora.run_report import write_report

    markdown, plot = write_report(run_dir, compare, output)
    click.echo(f"wrote {markdown} and {plot}")
    for folder in (run_dir, *compare):
        for warning in find_warnings(load_run(folder)):
            click.echo(f"warning ({folder}): {warning}", err=True)
