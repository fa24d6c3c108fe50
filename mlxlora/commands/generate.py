"""`mlxlora generate`: answer one prompt or a JSONL file of prompts, greedily by default."""

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from mlxlora.commands.chat import check_compare, model_options, sampling_options, sampling_settings
from mlxlora.errors import ConfigError, DataError, ModelError

logger = logging.getLogger("mlxlora")

ROW_SHAPES = ('Accepted rows: {"messages": [...]} (chat: the messages up to the last user turn), '
              '{"prompt": ...} (completions) or {"text": ...} (text, continued as plain text).')


@dataclass
class PromptRow:
    """One prompt and where it came from (file:line, or --prompt)."""

    source: str
    prompt: list[dict] | str


def read_prompts(path: Path) -> list[PromptRow]:
    """Read the prompt part of every row of a JSONL file; raise DataError listing all problems."""
    from mlxlora.data_formats import cap_problems

    try:
        content = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"--prompts {path}: file not found.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"--prompts {path}: cannot be read as UTF-8 text ({error}).") from None

    rows, problems = [], []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        prompt, problem = parse_prompt_row(line, source)
        if problem:
            problems.append(problem)
        else:
            rows.append(PromptRow(source, prompt))

    if not rows and not problems:
        problems.append(f"{path}: the file has no rows. Write one JSON object per line.")
    if problems:
        raise DataError(cap_problems(problems), header=f"--prompts {path}: {len(problems)} problems found:")
    return rows


def parse_prompt_row(line: str, source: str):
    """Return (prompt, None) for a valid row, or (None, problem)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"{source}: invalid JSON at column {error.colno}: {error.msg}."
    if not isinstance(row, dict):
        return None, f"{source}: expected a JSON object. {ROW_SHAPES}"

    if "messages" in row:
        return chat_prompt(row["messages"], source)
    for key in ("prompt", "text"):
        if key in row:
            if not isinstance(row[key], str):
                return None, f"{source}: \"{key}\" must be a string."
            return ([{"role": "user", "content": row[key]}] if key == "prompt" else row[key]), None
    return None, f"{source}: no known key (found: {', '.join(sorted(row)) or 'none'}). {ROW_SHAPES}"


def chat_prompt(messages, source: str):
    """Return the messages up to the last user turn, or a problem."""
    if not isinstance(messages, list) or not messages:
        return None, f"{source}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects."

    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, f"{source}: message {index} needs a string \"role\"."
        tool_call = message["role"] == "assistant" and message.get("tool_calls")
        if not isinstance(message.get("content"), str) and not tool_call:
            return None, f"{source}: message {index} ({message['role']}) needs a string \"content\"."

    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        return None, f"{source}: no user turn to answer. Add a message with \"role\": \"user\"."
    return messages[: users[-1] + 1], None


def add_system_prompt(rows: list[PromptRow], system_prompt: str | None) -> None:
    """Put the system prompt before chat prompts that have none; text prompts cannot take one."""
    if not system_prompt:
        return
    problems = []
    for row in rows:
        if isinstance(row.prompt, str):
            problems.append(f"{row.source}: a text row is continued as plain text, so it cannot "
                            f"take --system-prompt. Leave the option out or use chat rows.")
        elif row.prompt[0]["role"] != "system":
            row.prompt = [{"role": "system", "content": system_prompt}] + row.prompt
    if problems:
        raise ConfigError(problems)


def check_prompts(loaded, rows: list[PromptRow]) -> None:
    """Encode every prompt before generating, so a bad row stops the run before any compute."""
    from mlxlora.inference import prompt_tokens

    problems = []
    for row in rows:
        try:
            prompt_tokens(loaded.tokenizer, row.prompt)
        except ModelError as error:
            problems.append(f"{row.source}: {error}")
    if problems:
        raise DataError(problems)


def answer_row(loaded, row: PromptRow, settings, compare: bool) -> dict:
    """Return the output row for one prompt: the adapter's answer and, with compare, the base's."""
    from mlxlora.inference import adapters_disabled, generate_answer

    answer = generate_answer(loaded, row.prompt, settings)
    result = {"source": row.source, "prompt": row.prompt, "answer": answer.text,
              "finish_reason": answer.finish_reason, "num_tokens": answer.num_tokens}
    if compare:
        with adapters_disabled(loaded.model):
            base = generate_answer(loaded, row.prompt, settings)
        result.update(base_answer=base.text, base_finish_reason=base.finish_reason,
                      base_num_tokens=base.num_tokens)
    return result


def open_output(output: str | None):
    if output is None:
        return sys.stdout
    try:
        return open(output, "w", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--output {output}: cannot be written ({error.strerror}). Pass a "
                          "writable file path.") from None


def print_answer(result: dict, compare: bool) -> None:
    if not compare:
        click.echo(result["answer"])
        return
    click.echo(f"[base]\n{result['base_answer']}\n\n[adapter]\n{result['answer']}")


@click.command("generate")
@model_options
@click.option("--prompt", default=None,
              help="One prompt, sent as a user message (as plain text when the model has no "
                   "chat template).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="JSONL file of prompts in any training format: chat rows give their messages "
                   "up to the last user turn, completions rows their prompt, text rows their text.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="JSONL file for the answers, one row per prompt. Default: standard output.")
@click.option("--system-prompt", default=None,
              help="System message put before every chat prompt that has none.")
@sampling_options
@click.option("--compare", is_flag=True,
              help="Also generate the base model's answer (base_answer in the output rows).")
def command(model, adapter_path, prompt, prompts_file, output, system_prompt, temp, top_p,
            max_tokens, seed, compare) -> None:
    """Generate answers with a model and its adapter; greedy unless --temp is set.

    Each output row has source, prompt, answer, finish_reason ("stop" or "length") and
    num_tokens. A single --prompt without --output prints only the answer.
    """
    from mlxlora.inference import load_for_inference

    if (prompt is None) == (prompts_file is None):
        raise ConfigError("Pass exactly one of --prompt TEXT and --prompts FILE.jsonl.")
    settings = sampling_settings(temp, top_p, max_tokens, seed)
    if prompts_file is not None:
        rows = read_prompts(Path(prompts_file))
    else:
        rows = [PromptRow("--prompt", [{"role": "user", "content": prompt}])]
    add_system_prompt(rows, system_prompt)

    # Opened before the model loads, so that a bad --output path fails fast.
    single = prompt is not None and output is None
    stream = None if single else open_output(output)
    try:
        loaded = load_for_inference(model, adapter_path)
        check_compare(loaded, compare)
        check_prompts(loaded, rows)
        if single:
            print_answer(answer_row(loaded, rows[0], settings, compare), compare)
        else:
            write_answers(loaded, rows, settings, compare, stream)
    finally:
        if output is not None:
            stream.close()


def write_answers(loaded, rows: list[PromptRow], settings, compare: bool, stream) -> None:
    for number, row in enumerate(rows, start=1):
        result = answer_row(loaded, row, settings, compare)
        stream.write(json.dumps(result, ensure_ascii=False) + "\n")
        stream.flush()
        logger.info("prompt %d/%d (%s): %d tokens, %s", number, len(rows), row.source,
                    result["num_tokens"], result["finish_reason"])
