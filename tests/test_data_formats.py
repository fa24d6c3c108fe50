"""Reading, validating and locating JSONL training data."""

import json
from pathlib import Path

import pytest

from mlxlora.data_formats import find_splits, read_examples
from mlxlora.errors import DataError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "hello"}


def write_lines(path: Path, lines: list, newline: str = "\n", bom: bool = False) -> Path:
    """Write each item as one line: dicts and lists as JSON, strings verbatim."""
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    content = newline.join(rendered) + newline
    data = content.encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
    return path


def problems_of(path: Path, **keys) -> list[str]:
    with pytest.raises(DataError) as caught:
        read_examples(path, **keys)
    return caught.value.problems


@pytest.mark.parametrize(
    "row, kind, messages, text",
    [
        (CHAT, "chat", CHAT["messages"], None),
        (COMPLETION, "completions",
         [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], None),
        (TEXT, "text", None, "hello"),
        ({**TEXT, "id": 7, "meta": {"a": 1}}, "text", None, "hello"),
    ],
)
def test_read_examples_formats(tmp_path, row, kind, messages, text):
    path = write_lines(tmp_path / "train.jsonl", [row])

    [example] = read_examples(path)

    assert example.kind == kind
    assert example.messages == messages
    assert example.text == text
    assert example.raw == row
    assert example.source == f"{path}:1"


def test_read_examples_custom_keys(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [{"question": "q?", "answer": "a."}])

    [example] = read_examples(path, prompt_key="question", completion_key="answer")

    assert example.kind == "completions"
    assert example.messages[0] == {"role": "user", "content": "q?"}
    assert example.messages[1] == {"role": "assistant", "content": "a."}


def test_read_examples_tool_turns(tmp_path):
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    messages = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "12:00", "tool_call_id": "1"},
        {"role": "assistant", "content": "It is noon."},
    ]
    path = write_lines(tmp_path / "train.jsonl", [{"messages": messages}])

    [example] = read_examples(path)

    assert example.messages == messages


def test_read_examples_bom_crlf_blank(tmp_path):
    lines = [CHAT, "", "   ", CHAT, ""]
    path = write_lines(tmp_path / "train.jsonl", lines, newline="\r\n", bom=True)

    examples = read_examples(path)

    assert [example.source for example in examples] == [f"{path}:1", f"{path}:4"]
    assert examples[0].messages == CHAT["messages"]


def test_read_examples_keeps_unicode_line_separator(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a\u2028b"}\n', encoding="utf-8")

    [example] = read_examples(path)

    assert example.text == "a\u2028b"


def chat(*messages):
    return {"messages": list(messages)}


BAD_LINES = [
    ("invalid JSON", '{"text": "unterminated', ["invalid JSON at column", "one complete JSON object"]),
    ("pretty-printed", "{", ["invalid JSON", "one object per line"]),
    ("not an object", "[1, 2]", ["expected a JSON object, got a list", "Accepted lines"]),
    ("no known key", {"input": "x"}, ["no known key (found: input)", '{"text": ...}', "--prompt-key"]),
    ("unknown role", chat({"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}),
     ["message 0: unknown role 'bot'", "system, user, assistant, tool"]),
    ("role alias", chat({"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}),
     ["message 0: unknown role 'human'", "Use \"user\" for 'human'.", "message 1: unknown role 'gpt'"]),
    ("role missing", chat({"content": "x"}, {"role": "assistant", "content": "y"}),
     ["message 0: missing \"role\". Use one of: system, user"]),
    ("content not a string", chat({"role": "user", "content": [{"type": "text", "text": "x"}]},
                                  {"role": "assistant", "content": "y"}),
     ["message 0 (user): \"content\" must be a string, got a list", "Join the text parts"]),
    ("content missing", chat({"role": "user"}, {"role": "assistant", "content": "y"}),
     ["\"content\" must be a string, got null"]),
    ("empty messages", {"messages": []}, ["\"messages\" is empty"]),
    ("messages not a list", {"messages": "hi"}, ["\"messages\" must be a list"]),
    ("no assistant turn", chat({"role": "user", "content": "x"}), ["no assistant turn", "\"role\": \"assistant\""]),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]},
     ["ShareGPT", "\"human\" to role \"user\"", "\"gpt\" to \"assistant\"", "{\"messages\""]),
    ("sharegpt messages", chat({"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}),
     ["ShareGPT", "\"gpt\" to \"assistant\""]),
    ("completion missing", {"prompt": "x"}, ["missing \"completion\""]),
    ("prompt not a string", {"prompt": 3, "completion": "y"}, ["\"prompt\" must be a string, got a number"]),
    ("text not a string", {"text": None}, ["\"text\" must be a string, got null"]),
]


@pytest.mark.parametrize("line, expected", [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES])
def test_read_examples_bad_line(tmp_path, line, expected):
    # A valid first line shows that one bad line is reported on its own line number.
    path = write_lines(tmp_path / "train.jsonl", [TEXT, line])

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:2: ")
    for fragment in expected:
        assert fragment in problems[0]


def test_read_examples_mixed_formats(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [CHAT, TEXT])

    [problem] = problems_of(path)

    assert problem.startswith(f"{path}:2: this line is in text format")
    assert f"the first example ({path}:1) is in chat format" in problem
    assert "Use one format per file" in problem


@pytest.mark.parametrize("content", ["", "\n\n  \r\n"])
def test_read_examples_empty_file(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)

    [problem] = problems_of(path)

    assert problem == f"{path}: the file is empty. Add at least one example, one JSON object per line."


def test_read_examples_gathers_all_problems(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [TEXT, "{bad", {"x": 1}, TEXT, {"text": 5}])

    with pytest.raises(DataError) as caught:
        read_examples(path)

    assert [p.split(": ")[0] for p in caught.value.problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert str(caught.value).startswith(f"{path}: 3 problems found:")


def test_read_examples_caps_listing(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [TEXT] + ["{bad"] * 25)

    problems = problems_of(path)

    assert len(problems) == 21
    assert problems[19].startswith(f"{path}:21: ")
    assert problems[20] == "... and 5 more"


def test_read_examples_invalid_utf8(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "\xff"}\n')

    [problem] = problems_of(path)

    assert problem == f"{path}: not valid UTF-8 (byte 10). Save the file as UTF-8."


def test_read_examples_directory(tmp_path):
    [problem] = problems_of(tmp_path)

    assert problem.startswith(f"{tmp_path}: cannot be read (")
    assert problem.endswith("Pass a readable .jsonl file.")


def test_find_splits_folder(tmp_path):
    for name in ("train", "valid"):
        write_lines(tmp_path / f"{name}.jsonl", [TEXT])

    splits = find_splits(str(tmp_path))

    assert splits == {"train": tmp_path / "train.jsonl", "valid": tmp_path / "valid.jsonl"}


def test_find_splits_single_file(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", [TEXT])

    assert find_splits(str(path)) == {"train": path}


def test_find_splits_errors(tmp_path):
    missing = tmp_path / "nope"
    json_file = tmp_path / "data.json"
    json_file.write_text("[]")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_lines(folder / "training.jsonl", [TEXT])

    cases = [
        (missing, ["not found", "train.jsonl"]),
        (json_file, ["not a .jsonl file", "one JSON object per line"]),
        (folder, ["train.jsonl not found", "It contains: training.jsonl", "Name the training file train.jsonl"]),
    ]
    for path, expected in cases:
        with pytest.raises(DataError) as caught:
            find_splits(str(path))
        message = str(caught.value)
        assert message.startswith(f"--data {path}: ")
        for fragment in expected:
            assert fragment in message, (path, fragment)
