"""`mlxlora eval`: loss as training's validation computes it, perplexity, matches and errors."""

import json
import math
from types import SimpleNamespace

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner

from mlxlora.commands.eval import command, is_match, run_config
from mlxlora.config import TrainConfig
from mlxlora.data_formats import read_examples
from mlxlora.errors import ConfigError, DataError
from mlxlora.inference import GenerationSettings, generate_answer, load_for_inference
from mlxlora.prompt import encode_split
from mlxlora.step import TrainStep
from mlxlora.testing.tiny import save_model_folder
from mlxlora.trainer import validation_loss
from test_inference import save_tiny_adapter


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


ROWS = [chat_row(f"question {i} " + "?" * i, f"answer {i}" + "!" * (i % 3)) for i in range(6)]


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_folder = save_model_folder(root / "model")
    return model_folder, save_tiny_adapter(root / "adapter", model_folder)


@pytest.fixture(scope="module")
def adapted(run_folders):
    return load_for_inference(adapter_path=run_folders[1])


def write_data(folder, rows, name="test.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def evaluate(args):
    result = CliRunner().invoke(command, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def table(output: str) -> dict[str, list[str]]:
    """Map each row label of the printed table to its values."""
    rows = {}
    for line in output.splitlines()[1:]:
        label, values = line[:16].strip(), line[16:]
        rows[label] = [values[i:i + 18].strip() for i in range(0, len(values), 18)]
    return rows


def trainer_loss(loaded, path, config) -> float:
    """Validation loss as the trainer computes it, with the data as its valid split."""
    split = encode_split(read_examples(path), loaded.tokenizer, config)
    step = TrainStep(loaded.model, optim.SGD(learning_rate=0.0), None, compile=False)
    session = SimpleNamespace(valid_split=split, config=config, loaded=loaded, group=None,
                              step=step)
    loss = validation_loss(session)
    loaded.model.eval()
    return loss


def test_loss_matches_validation_loss(tmp_path, run_folders, adapted):
    data = write_data(tmp_path / "data", ROWS)
    result = evaluate(["--adapter-path", str(run_folders[1]), "--data", str(data),
                       "--batch-size", "4"])
    rows = table(result.stdout)

    config = TrainConfig(batch_size=4, val_batches=-1)
    expected = trainer_loss(adapted, data / "test.jsonl", config)
    assert rows[""] == ["base", "adapter"]
    assert float(rows["loss"][1]) == pytest.approx(expected, abs=5e-5)
    assert float(rows["perplexity"][1]) == pytest.approx(math.exp(float(rows["loss"][1])), rel=1e-3)
    assert result.stdout.startswith(f"{data / 'test.jsonl'}: 6 examples, ")


def test_base_column_is_model_without_adapter(tmp_path, run_folders):
    model_folder, adapter_folder = run_folders
    data = write_data(tmp_path / "data", ROWS)
    rows = table(evaluate(["--adapter-path", str(adapter_folder), "--data", str(data)]).stdout)

    base = load_for_inference(str(model_folder))
    expected = trainer_loss(base, data / "test.jsonl", TrainConfig(val_batches=-1))
    assert float(rows["loss"][0]) == pytest.approx(expected, abs=5e-5)
    assert rows["loss"][0] != rows["loss"][1]


def test_model_alone_has_one_column(tmp_path, run_folders):
    data = write_data(tmp_path / "data", ROWS)
    rows = table(evaluate(["--model", str(run_folders[0]), "--data", str(data)]).stdout)
    assert rows[""] == ["model"]
    assert len(rows["loss"]) == 1


def run_folder(tmp_path, run_folders, data, **settings):
    """Copy the adapter into a run folder with a training_config.json naming data and settings."""
    run = tmp_path / "run"
    run.mkdir()
    for file in run_folders[1].iterdir():
        (run / file.name).write_bytes(file.read_bytes())
    (run / "training_config.json").write_text(json.dumps({"config": {"data": str(data), **settings}}))
    return run


def test_training_run_settings_used(tmp_path, run_folders, adapted):
    data = write_data(tmp_path / "data", ROWS)
    run = run_folder(tmp_path, run_folders, data, max_seq_length=30, train_on_prompt=True,
                     batch_size=2)
    rows = table(evaluate(["--adapter-path", str(run)]).stdout)

    config = TrainConfig(max_seq_length=30, train_on_prompt=True, batch_size=2, val_batches=-1)
    expected = trainer_loss(adapted, data / "test.jsonl", config)
    default = trainer_loss(adapted, data / "test.jsonl", TrainConfig(val_batches=-1))
    assert float(rows["loss"][1]) == pytest.approx(expected, abs=5e-5)
    assert abs(expected - default) > 1e-3


def test_run_config_found_from_best_and_checkpoints(tmp_path, run_folders):
    run = run_folder(tmp_path, run_folders, tmp_path, batch_size=2)
    for adapter in (run, run / "best", run / "checkpoints" / "step-0000010"):
        assert run_config(str(adapter))["batch_size"] == 2
    assert run_config(str(tmp_path / "elsewhere")) == {}
    assert run_config(None) == {}


def greedy_answer(loaded, question: str) -> str:
    prompt = [{"role": "user", "content": question}]
    return generate_answer(loaded, prompt, GenerationSettings(max_tokens=8, seed=0)).text


def test_exact_match_counts(tmp_path, run_folders, adapted):
    answer = greedy_answer(adapted, "q1")
    data = write_data(tmp_path / "data", [chat_row("q1", answer), chat_row("q2", "no such answer")])
    rows = table(evaluate(["--adapter-path", str(run_folders[1]), "--data", str(data),
                           "--match", "exact", "--max-tokens", "8"]).stdout)
    assert rows["exact match"][1] == "1/2 (50.0%)"


def test_contains_match_counts(tmp_path, run_folders, adapted):
    part = greedy_answer(adapted, "q1").strip()[1:3]
    data = write_data(tmp_path / "data", [chat_row("q1", part)])
    args = ["--adapter-path", str(run_folders[1]), "--data", str(data), "--max-tokens", "8"]

    assert table(evaluate([*args, "--match", "contains"]).stdout)["contains match"][1] == "1/1 (100.0%)"
    assert table(evaluate([*args, "--generate"]).stdout)["exact match"][1] == "0/1 (0.0%)"
    assert "exact match" not in table(evaluate(args).stdout)


def test_limit_takes_first_examples(tmp_path, run_folders):
    data = write_data(tmp_path / "data", ROWS)
    result = evaluate(["--adapter-path", str(run_folders[1]), "--data", str(data), "--limit", "2"])
    assert result.stdout.startswith(f"{data / 'test.jsonl'}: 2 examples, ")


def test_is_match_modes():
    assert is_match(" 42\n", "42", "exact")
    assert not is_match("42 apples", "42", "exact")
    assert is_match("42 apples", " 42 ", "contains")
    assert not is_match("4 2", "42", "contains")


def test_missing_data_without_run(run_folders):
    with pytest.raises(ConfigError, match="--data is missing"):
        evaluate(["--adapter-path", str(run_folders[1])])


def test_folder_without_test_file(tmp_path, run_folders):
    data = write_data(tmp_path / "data", ROWS, name="valid.jsonl")
    with pytest.raises(ConfigError) as error:
        evaluate(["--model", str(run_folders[0]), "--data", str(data)])
    assert str(error.value) == (f"--data {data}: test.jsonl not found (the folder contains "
                                f"valid.jsonl). Pass the file to evaluate, e.g. --data "
                                f"{data / 'valid.jsonl'}.")


def test_data_file_errors(tmp_path, run_folders):
    text_file = tmp_path / "data.txt"
    text_file.write_text("x")
    with pytest.raises(ConfigError, match="not a .jsonl file"):
        evaluate(["--model", str(run_folders[0]), "--data", str(text_file)])
    with pytest.raises(ConfigError, match="not found"):
        evaluate(["--model", str(run_folders[0]), "--data", str(tmp_path / "none")])


def test_bad_rows_name_lines(tmp_path, run_folders):
    data = write_data(tmp_path / "data", [ROWS[0], {"question": "a"}])
    with pytest.raises(DataError, match=r"test.jsonl:2: no known key"):
        evaluate(["--model", str(run_folders[0]), "--data", str(data)])


def test_text_data_cannot_match(tmp_path, run_folders):
    data = write_data(tmp_path / "data", [{"text": "a b c"}])
    with pytest.raises(DataError, match="text rows have no separate answer"):
        evaluate(["--model", str(run_folders[0]), "--data", str(data), "--generate"])


def test_bad_numbers_listed(tmp_path, run_folders):
    data = write_data(tmp_path / "data", ROWS)
    with pytest.raises(ConfigError) as error:
        evaluate(["--model", str(run_folders[0]), "--data", str(data), "--limit", "0",
                  "--max-tokens", "0"])
    assert error.value.problems == ["--limit 0: must be at least 1",
                                    "--max-tokens 0: must be at least 1"]
    with pytest.raises(ConfigError) as error:
        evaluate(["--model", str(run_folders[0]), "--data", str(data), "--max-seq-length", "1",
                  "--batch-size", "0"])
    assert error.value.problems == ["--max-seq-length 1: must be at least 2",
                                    "--batch-size 0: must be at least 1"]
