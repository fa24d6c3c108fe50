"""`mlxlora generate`: prompt rows of every training format, JSONL output, compare and errors."""

import json

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import pytest
from click.testing import CliRunner

from mlxlora.commands.generate import command
from mlxlora.errors import ConfigError, DataError
from mlxlora.inference import GenerationSettings, generate_answer, load_for_inference
from mlxlora.testing.tiny import make_tokenizer, save_model_folder
from test_inference import save_tiny_adapter

GREEDY = GenerationSettings(max_tokens=5, seed=0)

CHAT_ROW = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "how are you?"},
                         {"role": "assistant", "content": "fine"}]}
CHAT_PROMPT = CHAT_ROW["messages"][:4]


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model_folder = save_model_folder(root / "model")
    return model_folder, save_tiny_adapter(root / "adapter", model_folder)


@pytest.fixture(scope="module")
def adapted(run_folders):
    return load_for_inference(adapter_path=run_folders[1])


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows))
    return path


def generate(args):
    result = CliRunner().invoke(command, ["--max-tokens", "5", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_row_per_prompt(tmp_path, run_folders, adapted):
    prompts = write_rows(tmp_path / "prompts.jsonl", [
        CHAT_ROW, {"prompt": "2+2=", "completion": "4"}, "", {"text": "Once upon"}])
    output = tmp_path / "answers.jsonl"
    generate(["--adapter-path", str(run_folders[1]), "--prompts", str(prompts),
              "--output", str(output)])

    rows = read_output(output)
    expected_prompts = [CHAT_PROMPT, [{"role": "user", "content": "2+2="}], "Once upon"]
    assert [row["prompt"] for row in rows] == expected_prompts
    assert [row["source"] for row in rows] == [f"{prompts}:1", f"{prompts}:2", f"{prompts}:4"]
    for row, prompt in zip(rows, expected_prompts):
        answer = generate_answer(adapted, prompt, GREEDY)
        assert row["answer"] == answer.text
        assert row["finish_reason"] == answer.finish_reason
        assert row["num_tokens"] == answer.num_tokens
        assert "base_answer" not in row


def test_greedy_output_reproducible(tmp_path, run_folders):
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    for output in (first, second):
        generate(["--adapter-path", str(run_folders[1]), "--prompts", str(prompts),
                  "--output", str(output)])
    assert first.read_text() == second.read_text()


def test_seeded_sampling_reproducible(tmp_path, run_folders):
    args = ["--adapter-path", str(run_folders[1]), "--prompt", "hi", "--temp", "1.5",
            "--max-tokens", "12"]
    first = generate([*args, "--seed", "4"]).stdout
    assert generate([*args, "--seed", "4"]).stdout == first
    assert generate([*args, "--seed", "5"]).stdout != first


def test_single_prompt_prints_answer(run_folders, adapted):
    result = generate(["--adapter-path", str(run_folders[1]), "--prompt", "hi"])
    answer = generate_answer(adapted, [{"role": "user", "content": "hi"}], GREEDY).text
    assert result.stdout == answer + "\n"


def test_prompts_without_output_print_jsonl(tmp_path, run_folders):
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    result = generate(["--adapter-path", str(run_folders[1]), "--prompts", str(prompts)])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["prompt"][0]["content"] for row in rows] == ["a", "b"]


def test_compare_adds_base_answer(tmp_path, run_folders, adapted):
    model_folder, adapter_folder = run_folders
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    output = tmp_path / "answers.jsonl"
    generate(["--adapter-path", str(adapter_folder), "--prompts", str(prompts), "--output",
              str(output), "--compare"])

    row = read_output(output)[0]
    base = load_for_inference(str(model_folder))
    prompt = [{"role": "user", "content": "a"}]
    assert row["base_answer"] == generate_answer(base, prompt, GREEDY).text
    assert row["answer"] == generate_answer(adapted, prompt, GREEDY).text
    assert row["base_answer"] != row["answer"]


def test_system_prompt_added_where_missing(tmp_path, run_folders):
    prompts = write_rows(tmp_path / "prompts.jsonl", [CHAT_ROW, {"prompt": "a"}])
    output = tmp_path / "answers.jsonl"
    generate(["--adapter-path", str(run_folders[1]), "--prompts", str(prompts), "--output",
              str(output), "--system-prompt", "Answer in French."])

    first, second = read_output(output)
    assert first["prompt"] == CHAT_PROMPT
    assert second["prompt"] == [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "a"}]


def test_system_prompt_rejected_for_text_rows(tmp_path, run_folders):
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"text": "Once"}])
    with pytest.raises(ConfigError, match=f"{prompts}:1: a text row .* cannot take --system-prompt"):
        generate(["--model", str(run_folders[0]), "--prompts", str(prompts),
                  "--system-prompt", "x"])


def test_bad_rows_listed_with_lines(tmp_path, run_folders):
    prompts = write_rows(tmp_path / "prompts.jsonl", [
        "{not json", "[1, 2]", {"question": "a"},
        {"messages": [{"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user"}]}, {"prompt": 3}, {"prompt": "fine"}])
    with pytest.raises(DataError) as error:
        generate(["--model", str(run_folders[0]), "--prompts", str(prompts)])

    problems = error.value.problems
    assert len(problems) == 6
    assert problems[0].startswith(f"{prompts}:1: invalid JSON at column 2")
    assert problems[1].startswith(f"{prompts}:2: expected a JSON object")
    assert problems[2].startswith(f"{prompts}:3: no known key (found: question)")
    assert problems[3].startswith(f"{prompts}:4: no user turn to answer")
    assert problems[4] == f"{prompts}:5: message 0 (user) needs a string \"content\"."
    assert problems[5] == f"{prompts}:6: \"prompt\" must be a string."


def test_empty_and_missing_prompts_file(tmp_path, run_folders):
    empty = write_rows(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="the file has no rows"):
        generate(["--model", str(run_folders[0]), "--prompts", str(empty)])
    with pytest.raises(DataError, match="file not found"):
        generate(["--model", str(run_folders[0]), "--prompts", str(tmp_path / "none.jsonl")])


def test_multi_turn_row_needs_template(tmp_path):
    folder = save_model_folder(tmp_path / "plain", tokenizer=make_tokenizer(chat_template=None))
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "a"}, CHAT_ROW])
    with pytest.raises(DataError) as error:
        generate(["--model", str(folder), "--prompts", str(prompts)])
    assert error.value.problems[0].startswith(f"{prompts}:2: This model has no chat template")


@pytest.mark.parametrize("args, message", [
    ([], "Pass exactly one of --prompt TEXT and --prompts FILE.jsonl."),
    (["--prompt", "a", "--prompts", "p.jsonl"], "Pass exactly one of --prompt TEXT and --prompts FILE.jsonl."),
    (["--prompt", "a", "--top-p", "1.5"], "--top-p 1.5: must be more than 0 and at most 1 (1 turns it off)"),
])
def test_bad_options(args, message, run_folders):
    with pytest.raises(ConfigError) as error:
        generate(["--model", str(run_folders[0]), *args])
    assert str(error.value) == message


def test_compare_needs_adapter(run_folders):
    with pytest.raises(ConfigError, match="needs an adapter"):
        generate(["--model", str(run_folders[0]), "--prompt", "a", "--compare"])


def test_unwritable_output(tmp_path, run_folders):
    output = tmp_path / "missing" / "answers.jsonl"
    with pytest.raises(ConfigError, match=f"--output {output}: cannot be written"):
        generate(["--model", str(run_folders[0]), "--prompt", "a", "--output", str(output)])
