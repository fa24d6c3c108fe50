"""Every shipped recipe: documented, resolvable, and trainable for 2 steps on a tiny model.

Recipes may name Hub models that are not available offline, so the training test replaces
mlxlora.session.load_model with the tiny llama and tokenizer of mlxlora.testing.tiny and
points data at fixture JSONL of the recipe's format.
"""

import json
import re
from pathlib import Path

import mlx.nn as nn
import pytest
from click.testing import CliRunner

from mlxlora.commands.recipes import command as recipes_command
from mlxlora.config import resolve_config
from mlxlora.data_formats import find_splits, read_examples
from mlxlora.loading import LoadedModel
from mlxlora.recipes import RECIPES_DIR, find_recipe, header_lines, list_recipes
from mlxlora.testing.tiny import make_model, make_tokenizer
from mlxlora.trainer import train

# The data format each recipe is written for.
RECIPE_FORMATS = {
    "quickstart": "chat",
    "chat-assistant": "chat",
    "json-output": "chat",
    "sql": "text",
    "summarization": "completions",
    "qlora-large": "chat",
    "all-layers": "chat",
    "tiny-test": "text",
}
NAMES = sorted(RECIPE_FORMATS)
KEY_LINE = re.compile(r"^([a-z_]+):")


def recipe_text(name: str) -> str:
    return (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def uncommented_keys(text: str) -> list[str]:
    """Return top-level keys with no comment on their line or in a block right above them.

    A comment block covers the key lines that follow it without a blank line in between.
    """
    missing, covered = [], False
    for line in text.splitlines():
        if not line.strip():
            covered = False
        elif line.startswith("#"):
            covered = True
        elif KEY_LINE.match(line) and "#" not in line and not covered:
            missing.append(KEY_LINE.match(line).group(1))
    return missing


def test_recipes_folder_has_documented_set():
    assert {recipe.name for recipe in list_recipes()} == set(RECIPE_FORMATS)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_header_command(name):
    recipe = find_recipe(name)

    assert recipe.title
    assert recipe.command is not None
    assert recipe.command.startswith(f"mlxlora train --recipe recipes/{name}.yaml")


@pytest.mark.parametrize("name", NAMES)
def test_recipe_every_key_commented(name):
    assert uncommented_keys(recipe_text(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_recipe_has_no_machine_paths(name):
    text = recipe_text(name)

    assert "/work/" not in text
    assert "shared/" not in text


@pytest.mark.parametrize("name", NAMES)
def test_recipe_resolves_with_data_format(name):
    resolved = resolve_config(str(RECIPES_DIR / f"{name}.yaml"))
    data = resolved.config.data

    if data is None:
        header = "\n".join(header_lines(recipe_text(name)))
        assert f"{RECIPE_FORMATS[name]} format" in header
        assert "--data" in find_recipe(name).command
    else:
        train_file = find_splits(data)["train"]
        examples = read_examples(train_file, resolved.config.prompt_key,
                                 resolved.config.completion_key)
        assert examples[0].kind == RECIPE_FORMATS[name]


def test_uncommented_keys_finds_bare_key():
    text = "# why\nr: 8\nlora_alpha: 16\n\nbatch_size: 4\nepochs: 1  # because\n"

    assert uncommented_keys(text) == ["batch_size"]


def fixture_rows(kind: str, prompt_key: str, completion_key: str, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        if kind == "text":
            rows.append({"text": f"table: t{i}\nQ: how many?\nA: SELECT COUNT(*) FROM t{i}"})
        elif kind == "completions":
            rows.append({prompt_key: f"A short document number {i} about rain.",
                         completion_key: f"Rain, part {i}."})
        else:
            rows.append({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Weather in city {i}?"},
                {"role": "assistant", "content": f'{{"city": "c{i}", "temp_c": {i}}}'},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You are welcome."},
            ]})
    return rows


def write_fixture(folder: Path, kind: str, prompt_key: str, completion_key: str) -> Path:
    folder.mkdir()
    for split, count in (("train", 8), ("valid", 4)):
        lines = [json.dumps(row) for row in fixture_rows(kind, prompt_key, completion_key, count)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_loader(calls: list, folder: Path):
    """Return a stand-in for load_model that builds the tiny llama, 4-bit when asked to keep
    a quantized base (dequantize=False), as QLoRA recipes do."""

    def load(spec, dtype="auto", dequantize=None, trust_remote_code=False):
        calls.append({"spec": spec, "dequantize": dequantize})
        model = make_model()
        quantized = dequantize is False
        if quantized:
            nn.quantize(model, group_size=32, bits=4)
        config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                  "vocab_size": 260}
        return LoadedModel(model, make_tokenizer(), spec, folder, config, quantized, "float32")

    return load


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_recipe_trains_two_steps(name, tmp_path, monkeypatch):
    recipe = str(RECIPES_DIR / f"{name}.yaml")
    recipe_config = resolve_config(recipe).config
    data = write_fixture(tmp_path / "data", RECIPE_FORMATS[name], recipe_config.prompt_key,
                         recipe_config.completion_key)
    calls = []
    monkeypatch.setattr("mlxlora.session.load_model", tiny_loader(calls, tmp_path))

    run = tmp_path / "run"
    resolved = resolve_config(recipe, {"data": str(data), "adapter_path": str(run), "iters": 2})
    state = train(resolved)

    assert state.step == 2
    assert calls[0]["spec"] == recipe_config.model
    assert calls[0]["dequantize"] == recipe_config.dequantize
    assert (run / "adapters.safetensors").is_file()
    assert (run / "report.md").is_file()
    assert (run / "loss.png").stat().st_size > 0


def test_recipes_command_lists_each_recipe():
    result = CliRunner().invoke(recipes_command, [])

    assert result.exit_code == 0
    for name in NAMES:
        assert f"$ mlxlora train --recipe recipes/{name}.yaml" in result.output


def test_recipes_command_prints_recipe():
    result = CliRunner().invoke(recipes_command, ["sql"])

    assert result.exit_code == 0
    assert result.output == recipe_text("sql")


def test_recipes_command_unknown_name():
    result = CliRunner().invoke(recipes_command, ["nope"])

    assert result.exit_code == 1
    assert "recipe 'nope' not found" in str(result.exception)
