"""The shipped recipes: commented YAML configs in the repository's recipes/ folder.

Each recipe starts with a comment block: a title line, then the command that runs it. The
folder sits next to the mlxlora package in a clone (the install script installs the clone
in editable mode), so it is found relative to this file.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from mlxlora.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
COMMAND = re.compile(r"^#\s+(mlxlora train .*)$")


@dataclass
class Recipe:
    """A recipe file with the title and command from its header comment."""

    name: str
    path: Path
    title: str
    command: str | None


def header_lines(text: str) -> list[str]:
    """Return the comment lines before the first YAML key, blank comment lines included."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            lines.append(line)
        elif line.strip():
            break
    return lines


def read_recipe_header(path: Path) -> Recipe:
    """Read a recipe's title (its first comment line) and its `mlxlora train` command."""
    lines = header_lines(path.read_text(encoding="utf-8"))
    title = lines[0].lstrip("#").strip() if lines else ""
    commands = [match.group(1).strip() for match in map(COMMAND.match, lines) if match]
    return Recipe(path.stem, path, title, commands[0] if commands else None)


def list_recipes(folder: Path = RECIPES_DIR) -> list[Recipe]:
    """Return the recipes of a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: recipes folder not found. The recipes ship in the "
                          "recipes/ folder of the mlxlora repository; pass --dir to point at it.")
    return [read_recipe_header(path) for path in sorted(folder.glob("*.yaml"))]


def find_recipe(name: str, folder: Path = RECIPES_DIR) -> Recipe:
    """Return the recipe called ``name`` (with or without .yaml); raise ConfigError if absent."""
    recipes = {recipe.name: recipe for recipe in list_recipes(folder)}
    key = name.removesuffix(".yaml")
    if key not in recipes:
        raise ConfigError(f"recipe {name!r} not found in {folder}. Available: "
                          f"{', '.join(recipes) or 'none'}.")
    return recipes[key]
