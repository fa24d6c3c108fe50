import click
import pytest

from mlxlora.config import FIELDS, TrainConfig, resolve_config
from mlxlora.errors import ConfigError


def write_recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_have_default_source():
    resolved = resolve_config()
    assert resolved.config == TrainConfig()
    assert set(resolved.sources.values()) == {"default"}


def test_flag_overrides_recipe_overrides_default(tmp_path):
    recipe = write_recipe(tmp_path, "r: 16\nbatch_size: 2\nlearning_rate: 1e-4\n")
    resolved = resolve_config(recipe, {"r": 32, "batch_size": None})
    assert resolved.config.r == 32
    assert resolved.sources["r"] == "flag --rank"
    assert resolved.config.batch_size == 2
    assert resolved.sources["batch_size"] == f"recipe {recipe}"
    assert resolved.config.learning_rate == 1e-4
    assert resolved.sources["seed"] == "default"


def test_false_boolean_flag_source_names_no_flag():
    resolved = resolve_config(None, {"dequantize": False, "grad_checkpoint": True})
    assert resolved.sources["dequantize"] == "flag --no-dequantize"
    assert resolved.sources["grad_checkpoint"] == "flag --grad-checkpoint"


def test_unknown_keys_all_reported_with_suggestion(tmp_path):
    recipe = write_recipe(tmp_path, "rank: 8\nlearnig_rate: 1e-3\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(recipe)
    message = str(error.value)
    assert "unknown key 'rank'; use 'r', the recipe key of --rank." in message
    assert "did you mean 'learning_rate'" in message


def test_range_error_names_flag():
    with pytest.raises(ConfigError, match=r"r \(--rank\) must be at least 1, got 0"):
        resolve_config(None, {"r": 0})


@pytest.mark.parametrize("text, fragment", [
    ("r: eight\n", "r must be int"),
    ("use_rslora: 'yes'\n", "use_rslora must be true or false"),
    ("lr_schedule: exponential\n", "lr_schedule must be one of constant, linear, cosine"),
    ("target_modules: 5\n", "target_modules must be a list of strings"),
    ("lora_dropout: 1.5\n", "lora_dropout must be in [0, 1)"),
    ("batch_size: 0\n", "batch_size must be at least 1"),
    ("r: null\n", "r must not be null"),
])
def test_invalid_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        resolve_config(write_recipe(tmp_path, text))
    assert fragment in str(error.value)


def test_yaml_error_names_line(tmp_path):
    recipe = write_recipe(tmp_path, "r: 8\nbatch_size: [1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: invalid YAML"):
        resolve_config(recipe)


def test_missing_recipe_named():
    with pytest.raises(ConfigError, match="--recipe nowhere.yaml: file not found"):
        resolve_config("nowhere.yaml")


def test_recipe_paths_relative_to_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    resolved = resolve_config(write_recipe(tmp_path, "data: data\n"))
    assert resolved.config.data == str(tmp_path / "data")


def test_comma_separated_targets_from_flag():
    resolved = resolve_config(None, {"target_modules": "q_proj, v_proj"})
    assert resolved.config.target_modules == ["q_proj", "v_proj"]


def test_ints_become_floats_where_allowed(tmp_path):
    resolved = resolve_config(write_recipe(tmp_path, "lora_alpha: 32\nlearning_rate: 1\n"))
    assert isinstance(resolved.config.lora_alpha, float)
    assert isinstance(resolved.config.learning_rate, float)


def test_every_field_has_help():
    assert all(spec.metadata.get("help") for spec in FIELDS.values())


def test_describe_lists_every_field():
    lines = resolve_config().describe()
    assert len(lines) == len(FIELDS)
    assert any(line.startswith("r ") and "(default)" in line for line in lines)


def test_bare_resume_means_adapter_path():
    from click.testing import CliRunner

    from mlxlora.commands.options import config_options

    seen = {}

    @click.command()
    @config_options(["adapter_path", "resume"])
    def probe(**flags):
        seen.update(resolve_config(None, flags).config.to_dict())

    runner = CliRunner()
    assert runner.invoke(probe, ["--adapter-path", "runs/a", "--resume"]).exit_code == 0
    assert seen["resume"] == "runs/a"
    assert runner.invoke(probe, ["--resume", "runs/b/checkpoints/step-0000010"]).exit_code == 0
    assert seen["resume"] == "runs/b/checkpoints/step-0000010"


def test_train_without_data_named():
    from click.testing import CliRunner

    from mlxlora.cli import group, register_commands

    register_commands()
    result = CliRunner().invoke(group, ["train", "--iters", "1"])
    assert isinstance(result.exception, ConfigError)
    assert "--data is required" in str(result.exception)


def test_recipe_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    recipe = write_recipe(tmp_path, "data: data\nadapter_path: out\n")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_config("recipe.yaml")
    assert resolved.config.data == str(tmp_path / "data")
    assert resolved.config.adapter_path == str(tmp_path / "out")


def test_train_missing_data_folder_before_output(tmp_path):
    from click.testing import CliRunner

    from mlxlora.cli import group, register_commands
    from mlxlora.errors import DataError

    register_commands()
    output = tmp_path / "out"
    result = CliRunner().invoke(group, ["train", "--data", str(tmp_path / "nope"),
                                        "--adapter-path", str(output)])
    assert isinstance(result.exception, DataError)
    assert "nope" in str(result.exception)
    assert not output.exists()
