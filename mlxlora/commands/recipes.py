"""`mlxlora recipes`: list the shipped recipes, or print one."""

from pathlib import Path

import click

from mlxlora.recipes import RECIPES_DIR, find_recipe, list_recipes


@click.command("recipes")
@click.argument("name", required=False)
@click.option("--dir", "folder", type=click.Path(file_okay=False), default=str(RECIPES_DIR),
              show_default=True, help="Folder of recipe YAML files.")
def command(name: str | None, folder: str) -> None:
    """List the recipes with the command that runs each; with NAME, print that recipe.

    A recipe is a commented YAML file of `mlxlora train` options, and a comment next to
    each value gives the reason for it. Copy one to start your own:
    mlxlora recipes NAME > my-recipe.yaml. Relative paths in a recipe are relative to the
    recipe's folder, so check data and adapter_path in the copy.
    """
    if name:
        click.echo(find_recipe(name, Path(folder)).path.read_text(encoding="utf-8"), nl=False)
        return

    recipes = list_recipes(Path(folder))
    width = max((len(recipe.name) for recipe in recipes), default=0)
    for recipe in recipes:
        click.echo(f"{recipe.name:<{width}}  {recipe.title}")
        if recipe.command:
            click.echo(f"{'':<{width}}  $ {recipe.command}")
