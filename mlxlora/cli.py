"""The `mlxlora` command: a click group whose subcommands live in mlxlora/commands/.

Each module in mlxlora/commands/ that defines ``command`` (a click command) is registered
under that command's name, so adding a subcommand touches no other file.
"""

import importlib
import pkgutil
import sys

import click

import mlxlora
from mlxlora import commands
from mlxlora.errors import MlxloraError
from mlxlora.report_log import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(mlxlora.__version__, prog_name="mlxlora")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def group(verbose: bool) -> None:
    """LoRA fine-tuning on MLX: train an adapter, chat with it, fuse it into a model."""
    setup_logging(verbose)


def register_commands() -> None:
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"mlxlora.commands.{module_info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            group.add_command(command)


def main() -> None:
    """Run the CLI; user errors print their message and exit with status 2."""
    register_commands()
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except MlxloraError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
