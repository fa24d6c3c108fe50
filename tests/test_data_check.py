"""The data check: one small data set per problem, each with the exact finding expected."""

import json
import logging

import pytest
from click.testing import CliRunner

from mlxlora.config import TrainConfig
from mlxlora.data_check import check_before_training, check_data
from mlxlora.errors import DataError
from mlxlora.testing.tiny import make_tokenizer


def chat(*turns) -> dict:
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return {"messages": [{"role": roles[role], "content": text} for role, text in turns]}


def pair(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


CLEAN = [
    pair("What is the capital of France?", "The capital of France is Paris."),
    pair("What is the capital of Spain?", "The capital of Spain is Madrid."),
    pair("What is the capital of Italy?", "The capital of Italy is Rome."),
]

CLEAN_VALID = [pair("What is the capital of Peru?", "The capital of Peru is Lima.")]


def write_split(folder, name: str, rows: list) -> None:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_data(tmp_path, train: list, valid: list | None = None):
    folder = tmp_path / "data"
    folder.mkdir()
    write_split(folder, "train", train)
    if valid is not None:
        write_split(folder, "valid", valid)
    return folder


# (case, train rows, valid rows, level, check, split, sources as file:line, phrase in message)
CASES = [
    ("invalid JSON", [CLEAN[0], '{"prompt": "x",'], None,
     "error", "invalid-line", "train", ["train.jsonl:2"], "invalid JSON"),
    ("mixed formats", [CLEAN[0], {"text": "plain"}], None,
     "error", "mixed-formats", "train", ["train.jsonl:2"], "Use one format per file"),
    ("unknown role", [{"messages": [{"role": "human", "content": "hi"},
                                    {"role": "assistant", "content": "hello there"}]}], None,
     "error", "unknown-role", "train", ["train.jsonl:1"], 'Use "user" for \'human\''),
    ("ShareGPT line", [{"conversations": [{"from": "human", "value": "hi"}]}], None,
     "error", "sharegpt-format", "train", ["train.jsonl:1"], '"human" to role "user"'),
    ("ShareGPT keys", [{"messages": [{"from": "human", "value": "hi"},
                                     {"role": "assistant", "content": "hello there"}]}], None,
     "error", "sharegpt-format", "train", ["train.jsonl:1"], '"gpt" to "assistant"'),
    ("two user turns", [chat(("u", "hi"), ("u", "are you there"), ("a", "yes I am here"))], None,
     "warning", "repeated-role", "train", ["train.jsonl:1"], "same role in a row"),
    ("assistant first", [chat(("a", "welcome back"), ("u", "hi"), ("a", "hello there"))], None,
     "warning", "assistant-first", "train", ["train.jsonl:1"], "an assistant turn first"),
    ("late system", [chat(("u", "hi"), ("s", "be brief"), ("a", "hello there"))], None,
     "warning", "late-system", "train", ["train.jsonl:1"], "after the first position"),
    ("empty completion", [CLEAN[0], pair("What is two plus two?", " ")], None,
     "warning", "empty-string", "train", ["train.jsonl:2"], "empty completion"),
    ("empty prompt", [CLEAN[0], pair("", "The answer is four.")], None,
     "warning", "empty-string", "train", ["train.jsonl:2"], "empty prompt"),
    ("empty text", [{"text": "some words here"}, {"text": ""}], None,
     "warning", "empty-string", "train", ["train.jsonl:2"], "empty text"),
    ("exact duplicate", [CLEAN[0], CLEAN[1], CLEAN[0], CLEAN[0]], None,
     "warning", "duplicates", "train", ["train.jsonl:3", "train.jsonl:4"], "2 rows are exact copies"),
    ("near duplicate", [CLEAN[0], pair("what is  the capital of FRANCE?", CLEAN[0]["completion"])],
     None, "warning", "near-duplicates", "train", ["train.jsonl:2"], "case and whitespace"),
    ("same prompt", [CLEAN[0], pair(CLEAN[0]["prompt"], "Paris is the capital of France."),
                     CLEAN[1]], None,
     "warning", "same-prompt", "train", ["train.jsonl:1", "train.jsonl:2"],
     "1 prompt has more than one different completion"),
    ("leakage", CLEAN, [CLEAN[2], CLEAN_VALID[0]],
     "warning", "leakage", "valid", ["valid.jsonl:1"], "1 of 2 valid rows also appear in train"),
    ("shared prompt", CLEAN, [pair(CLEAN[1]["prompt"], "Madrid is the capital of Spain.")],
     "info", "shared-prompts", "valid", ["valid.jsonl:1"], "share a prompt"),
    ("short completion", [CLEAN[0], pair("Is Paris in France?", "Yes.")], None,
     "info", "short-completions", "train", ["train.jsonl:2"], "2 words or fewer"),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_problem_finding(tmp_path, case):
    _, train, valid, level, check, split, sources, phrase = case
    folder = make_data(tmp_path, train, valid)

    report = check_data(str(folder), tokenizer=make_tokenizer())
    found = [f for f in report.findings if f.check == check]

    assert len(found) == 1, [(f.check, f.message) for f in report.findings]
    assert found[0].level == level
    assert found[0].split == split
    assert found[0].sources == [str(folder / source) for source in sources]
    assert phrase in found[0].message
    expected_code = {"error": 2, "warning": 1, "info": 0}[level]
    assert report.exit_code >= expected_code


def test_clean_data_no_findings(tmp_path):
    folder = make_data(tmp_path, CLEAN, CLEAN_VALID)

    report = check_data(str(folder), tokenizer=make_tokenizer())

    assert report.findings == []
    assert report.exit_code == 0
    assert report.splits["train"].format == "completions"
    assert report.splits["train"].rows == 3
    assert report.splits["train"].distinct_prompts == 3


def test_without_model_notes_it(tmp_path):
    folder = make_data(tmp_path, CLEAN)

    report = check_data(str(folder))

    assert [(f.level, f.check) for f in report.findings] == [("info", "no-model")]
    assert report.exit_code == 0
    assert report.splits["train"].tokens is None


def test_chat_without_template_error(tmp_path):
    folder = make_data(tmp_path, [chat(("u", "hi"), ("a", "hello there friend"))])

    report = check_data(str(folder), tokenizer=make_tokenizer(chat_template=None))

    assert [(f.level, f.check) for f in report.errors] == [("error", "no-chat-template")]
    assert "chat data needs a chat template" in report.errors[0].message
    assert str(folder / "train.jsonl") in report.errors[0].message
    assert report.exit_code == 2


REJECTING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_failure_error(tmp_path):
    rows = [chat(("u", "hi"), ("a", "hello there friend")),
            chat(("u", "hi"), ("u", "again"), ("a", "hello there friend"))]
    folder = make_data(tmp_path, rows)

    report = check_data(str(folder), tokenizer=make_tokenizer(chat_template=REJECTING_TEMPLATE))

    failed = [f for f in report.findings if f.check == "encode-failed"]
    assert len(failed) == 1
    assert failed[0].level == "error"
    assert failed[0].sources == [str(folder / "train.jsonl:2")]
    assert "roles must alternate" in failed[0].message


def test_token_lengths_exact(tmp_path):
    # The byte-level tokenizer makes one token per byte plus one per special token:
    # <|im_start|> "user\nhi" <|im_end|> "\n" <|im_start|> "assistant\n" "yo" <|im_end|>
    folder = make_data(tmp_path, [pair("hi", "yo")])

    report = check_data(str(folder), tokenizer=make_tokenizer())
    tokens = report.splits["train"].tokens

    assert tokens["total"]["max"] == 24
    assert tokens["completion"]["max"] == 3
    assert tokens["prompt"]["max"] == 21
    assert tokens["tokens_per_epoch"] == 24
    assert tokens["trained_tokens_per_epoch"] == 3
    assert tokens["trained_share"] == pytest.approx(3 / 24)
    assert tokens["padded_tokens_per_epoch"] == 32


def test_too_long_loses_targets(tmp_path):
    rows = [pair("hi", "yo"), pair("a long prompt about the weather", "a long answer too")]
    folder = make_data(tmp_path, rows)
    config = TrainConfig(max_seq_length=30)

    report = check_data(str(folder), config, make_tokenizer())
    checks = {f.check: f for f in report.findings}
    long_source = [str(folder / "train.jsonl:2")]

    assert checks["too-long"].sources == long_source
    assert "longest: 68 tokens" in checks["too-long"].message
    assert checks["lost-targets"].sources == long_source
    assert checks["no-targets"].sources == long_source
    assert checks["no-targets"].level == "warning"
    assert report.splits["train"].tokens["over_max_seq_length"] == 1


def test_all_rows_untrainable_error(tmp_path):
    folder = make_data(tmp_path, [pair("a long prompt about the weather", "an answer")])

    report = check_data(str(folder), TrainConfig(max_seq_length=20), make_tokenizer())
    no_targets = [f for f in report.findings if f.check == "no-targets"]

    assert no_targets[0].level == "error"
    assert "nothing is left to train" in no_targets[0].message


def test_render_matches_chat_prompt(tmp_path):
    folder = make_data(tmp_path, [chat(("s", "Be brief."), ("u", "hi"), ("a", "yo"))])

    report = check_data(str(folder), tokenizer=make_tokenizer())
    first = report.renders[0]

    assert len(report.renders) == 1
    assert first["training_text"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                      "hi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>")
    assert first["trained"] == ["yo<|im_end|>"]
    assert first["chat_prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                    "hi<|im_end|>\n<|im_start|>assistant\n")
    assert first["chat_prompt_matches"] is True
    assert first["system_prompt"] == "Be brief."


def test_renders_two_examples(tmp_path):
    folder = make_data(tmp_path, CLEAN)

    report = check_data(str(folder), tokenizer=make_tokenizer())

    assert [r["source"] for r in report.renders] == [str(folder / "train.jsonl:1"),
                                                     str(folder / "train.jsonl:2")]
    assert all(r["chat_prompt_matches"] for r in report.renders)


def test_hints_first_words(tmp_path):
    folder = make_data(tmp_path, CLEAN)

    hints = check_data(str(folder)).splits["train"].hints

    assert hints["first_words"] == [["The", 3]]
    assert hints["completion_words"]["min"] == 6
    assert hints["completion_words"]["max"] == 6


def test_training_hook_raises_errors(tmp_path):
    folder = make_data(tmp_path, [CLEAN[0], '{"prompt": "x",'])
    config = TrainConfig(data=str(folder))

    with pytest.raises(DataError) as error:
        check_before_training(config, make_tokenizer())

    assert "training did not start" in error.value.header
    assert any("train.jsonl:2" in problem for problem in error.value.problems)


def test_training_hook_logs_warnings(tmp_path, caplog):
    folder = make_data(tmp_path, [CLEAN[0], CLEAN[0], CLEAN[1]])
    config = TrainConfig(data=str(folder))
    logger = logging.getLogger("mlxlora")
    logger.propagate = True

    try:
        with caplog.at_level(logging.WARNING, logger="mlxlora"):
            report = check_before_training(config, make_tokenizer())
    finally:
        logger.propagate = False

    assert [f.check for f in report.warnings] == ["duplicates"]
    assert any("exact copy" in record.getMessage() for record in caplog.records)


def test_cli_exit_codes(tmp_path):
    from mlxlora.commands.data import command

    runner = CliRunner()
    clean = make_data(tmp_path, CLEAN, CLEAN_VALID)
    duplicated = tmp_path / "duplicated.jsonl"
    duplicated.write_text(json.dumps(CLEAN[0]) + "\n" + json.dumps(CLEAN[0]) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")

    assert runner.invoke(command, ["check", str(clean)]).exit_code == 0
    assert runner.invoke(command, ["check", str(duplicated)]).exit_code == 1
    result = runner.invoke(command, ["check", str(broken)])
    assert result.exit_code == 2
    assert "ERROR invalid-line" in result.output


def test_cli_missing_path_names_argument(tmp_path):
    from mlxlora.commands.data import command
    from mlxlora.errors import DataError

    missing = tmp_path / "nowhere"

    result = CliRunner().invoke(command, ["check", str(missing)])

    assert isinstance(result.exception, DataError)
    assert str(result.exception).startswith(f"DATA {missing}: not found.")
    assert "--data" not in str(result.exception)


def test_cli_json(tmp_path):
    from mlxlora.commands.data import command

    folder = make_data(tmp_path, [CLEAN[0], CLEAN[0]])

    result = CliRunner().invoke(command, ["check", str(folder), "--json"])
    report = json.loads(result.output)

    assert report["exit_code"] == 1
    assert report["splits"]["train"]["rows"] == 2
    assert [f["check"] for f in report["findings"]] == ["duplicates", "no-model"]


def test_real_data_sets(shared_data):
    wwdc = check_data(str(shared_data / "wwdc25"))
    identity = check_data(str(shared_data / "identity-chat"))
    wikisql = check_data(str(shared_data / "wikisql"))

    assert wwdc.splits["train"].rows == 1800
    assert wwdc.splits["train"].distinct_prompts == 271
    assert {f.check for f in wwdc.warnings} >= {"duplicates", "same-prompt", "leakage"}
    assert identity.splits["train"].format == "chat"
    assert identity.splits["train"].rows == 450
    assert [f.check for f in wikisql.warnings] == ["duplicates", "near-duplicates"]
    assert wikisql.warnings[0].sources == [str(shared_data / "wikisql" / "train.jsonl:162")]
