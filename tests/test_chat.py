"""`mlxlora chat`: piped chat, history, commands, compare mode, terminal mode and bad options."""

import builtins
import sys

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
import pytest
from click.testing import CliRunner

from mlxlora import cli
from mlxlora.commands.chat import ChatSession, Conversation, command, one_line
from mlxlora.errors import ConfigError
from mlxlora.inference import (GenerationSettings, generate_answer, load_for_inference,
                                prompt_tokens)
from mlxlora.testing.tiny import make_tokenizer, save_model_folder
from test_inference import save_tiny_adapter

SETTINGS = GenerationSettings(max_tokens=6, seed=0)


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_folder = save_model_folder(root / "model")
    return model_folder, save_tiny_adapter(root / "adapter", model_folder)


@pytest.fixture(scope="module")
def adapted(run_folders):
    return load_for_inference(adapter_path=run_folders[1])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat(args, lines):
    result = CliRunner().invoke(command, ["--max-tokens", "6", *args], input=lines)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def expected(loaded, messages):
    return one_line(generate_answer(loaded, messages, SETTINGS).text)


def test_piped_one_answer_per_line(run_folders, adapted):
    result = chat(["--adapter-path", str(run_folders[1])], "hello\n\nworld\n")

    first = generate_answer(adapted, [user("hello")], SETTINGS).text
    lines = result.stdout.splitlines()
    assert lines == [one_line(first),
                     expected(adapted, [user("hello"), assistant(first), user("world")])]


def test_reset_clears_history(run_folders, adapted):
    result = chat(["--adapter-path", str(run_folders[1])], "hello\n/reset\nhello\n")
    answer = expected(adapted, [user("hello")])
    assert result.stdout.splitlines() == [answer, answer]


def test_history_kept_without_reset(run_folders, adapted):
    result = chat(["--adapter-path", str(run_folders[1])], "hello\nhello\n")
    first = generate_answer(adapted, [user("hello")], SETTINGS).text
    second = expected(adapted, [user("hello"), assistant(first), user("hello")])
    assert result.stdout.splitlines()[1] == second


def test_conversation_drops_oldest_turns():
    conversation = Conversation("be brief", keeps_history=True)
    for number in range(3):
        conversation.record(f"question {number}", f"answer {number}")

    messages = conversation.prompt("question 3", fits=lambda messages: len(messages) <= 4)

    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1:] == [user("question 2"), assistant("answer 2"), user("question 3")]
    assert conversation.turns == [user("question 2"), assistant("answer 2")]


def test_conversation_keeps_turns_that_fit():
    conversation = Conversation(None, keeps_history=True)
    conversation.record("question", "answer")

    messages = conversation.prompt("next", fits=lambda messages: True)

    assert messages == [user("question"), assistant("answer"), user("next")]


def test_session_trims_history_to_context(adapted):
    session = ChatSession(adapted, SETTINGS)
    session.answer("model", "hello")
    only_new = prompt_tokens(adapted.tokenizer, [user("world")])
    session.context_length = len(only_new) + SETTINGS.max_tokens

    answer = session.answer("model", "world")

    assert answer.text == generate_answer(adapted, [user("world")], SETTINGS).text
    assert session.sides["model"].turns == [user("world"), assistant(answer.text)]


def test_quit_stops_reading(run_folders):
    result = chat(["--adapter-path", str(run_folders[1])], "hello\n/quit\nworld\nagain\n")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 1


def test_unknown_command_not_sent(run_folders, caplog):
    result = chat(["--adapter-path", str(run_folders[1])], "/rest\nhello\n")
    assert len(result.stdout.splitlines()) == 1
    assert "unknown command /rest" in caplog.text


def test_system_prompt_starts_conversation(run_folders, adapted):
    result = chat(["--adapter-path", str(run_folders[1]), "--system-prompt", "Be brief."],
                  "hello\n")
    system = {"role": "system", "content": "Be brief."}
    assert result.stdout.splitlines() == [expected(adapted, [system, user("hello")])]


def test_compare_shows_base_and_adapter(run_folders, adapted):
    model_folder, adapter_folder = run_folders
    result = chat(["--adapter-path", str(adapter_folder), "--compare"], "hello\n")

    base = load_for_inference(str(model_folder))
    base_answer = expected(base, [user("hello")])
    adapter_answer = expected(adapted, [user("hello")])
    assert base_answer != adapter_answer
    assert result.stdout.splitlines() == [f"base: {base_answer}", f"adapter: {adapter_answer}"]


def test_compare_sides_keep_own_history(run_folders, adapted):
    model_folder, adapter_folder = run_folders
    result = chat(["--adapter-path", str(adapter_folder), "--compare"], "hello\nagain\n")

    base = load_for_inference(str(model_folder))
    base_first = generate_answer(base, [user("hello")], SETTINGS).text
    base_second = expected(base, [user("hello"), assistant(base_first), user("again")])
    assert result.stdout.splitlines()[2] == f"base: {base_second}"


def test_compare_needs_adapter(run_folders):
    with pytest.raises(ConfigError, match="--compare .* needs an adapter: pass --adapter-path"):
        chat(["--model", str(run_folders[0]), "--compare"], "hello\n")


def test_bad_sampling_options_listed(run_folders):
    with pytest.raises(ConfigError) as error:
        chat(["--model", str(run_folders[0]), "--temp", "-1", "--top-p", "0",
              "--max-tokens", "0"], "hello\n")
    problems = error.value.problems
    assert problems[0] == "--temp -1.0: must be 0 (greedy) or more"
    assert problems[1].startswith("--top-p 0.0: must be more than 0 and at most 1")
    assert problems[2] == "--max-tokens 0: must be at least 1"


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(Exception, match="adapter folder .* not found"):
        chat(["--adapter-path", str(tmp_path / "none")], "hello\n")


def test_no_template_model_rejects_system_prompt(tmp_path):
    folder = save_model_folder(tmp_path / "plain", tokenizer=make_tokenizer(chat_template=None))
    with pytest.raises(ConfigError, match="--system-prompt: this model has no chat template"):
        chat(["--model", str(folder), "--system-prompt", "hi"], "hello\n")


def test_no_template_model_continues_each_line(tmp_path, caplog):
    folder = save_model_folder(tmp_path / "plain", tokenizer=make_tokenizer(chat_template=None))
    result = chat(["--model", str(folder)], "Once\nOnce\n")

    answer = expected(load_for_inference(str(folder)), "Once")
    assert result.stdout.splitlines() == [answer, answer]
    assert "no chat template" in caplog.text


def test_one_line_escapes_breaks():
    assert one_line("a\nb\\n\r") == "a\\nb\\\\n\\r"


def test_cli_prints_error_without_traceback(run_folders, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mlxlora", "chat", "--model", str(run_folders[0]),
                                      "--temp", "-2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --temp -2.0: must be 0 (greedy) or more\n"


def fake_input(monkeypatch, lines):
    pending = list(lines)

    def read(prompt=""):
        if not pending:
            raise EOFError
        return pending.pop(0)

    monkeypatch.setattr(builtins, "input", read)


def test_terminal_streams_answers(adapted, monkeypatch, capsys):
    fake_input(monkeypatch, ["hello", "/quit", "never read"])
    ChatSession(adapted, SETTINGS).run_terminal()

    output = capsys.readouterr().out
    answer = generate_answer(adapted, [user("hello")], SETTINGS).text
    assert output.startswith("Chat with ")
    assert output.endswith(answer + "\n")


def test_terminal_compare_table(adapted, monkeypatch, capsys):
    fake_input(monkeypatch, ["hello"])
    session = ChatSession(adapted, SETTINGS, compare=True)
    session.run_terminal()

    output = capsys.readouterr().out
    assert "base" in output
    assert "adapter" in output
    assert len(session.sides["base"].turns) == 2
    assert len(session.sides["adapter"].turns) == 2


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2_gguf):
    result = chat(["--model", str(smollm2_gguf), "--max-tokens", "30"],
                  "What is the capital of France?\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert "Paris" in lines[0]
