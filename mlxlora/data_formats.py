"""Find the JSONL splits of a data set and read and validate their lines.

Three line formats are accepted, one per file:

- chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- completions: ``{"prompt": "...", "completion": "..."}`` (the keys are configurable)
- text: ``{"text": "..."}``

Every problem of a file is gathered into one DataError, so a user fixes the file once and
no compute is spent on data that cannot be trained.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from mlxlora.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")
# Role names from other chat formats, mapped to the role to use instead.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "developer": "system", "function": "tool", "ipython": "tool"}
MAX_LISTED_PROBLEMS = 20


@dataclass
class Example:
    """One validated line of a data file.

    ``messages`` is set for chat and completions lines (a completion becomes a user turn and
    an assistant turn), ``text`` for text lines. ``raw`` is the parsed JSON object.
    """

    source: str
    kind: str
    messages: list[dict] | None
    text: str | None
    raw: dict


def find_splits(data: str, label: str = "--data") -> dict[str, Path]:
    """Return the paths of the train split and of the valid and test splits that exist.

    ``data`` is a folder with train.jsonl and optional valid.jsonl and test.jsonl, or one
    .jsonl file, which becomes the train split. Errors name it as ``label``: the option or
    argument the user set.
    """
    path = Path(data)
    layout = "a folder with train.jsonl (and optional valid.jsonl, test.jsonl) or one .jsonl file"

    if not path.exists():
        raise DataError(f"{label} {data}: not found. Pass {layout}.")

    if path.is_file():
        if path.suffix != ".jsonl":
            raise DataError(
                f"{label} {data}: not a .jsonl file. Write one JSON object per line in a file "
                f"ending in .jsonl, or pass {layout}."
            )
        return {"train": path}

    splits = {name: path / f"{name}.jsonl" for name in SPLIT_NAMES}
    if not splits["train"].is_file():
        present = sorted(p.name for p in path.glob("*.jsonl"))
        found = f" It contains: {', '.join(present)}." if present else ""
        raise DataError(
            f"{label} {data}: train.jsonl not found in this folder.{found} "
            f"Name the training file train.jsonl, or pass the .jsonl file itself."
        )
    return {name: split for name, split in splits.items() if split.is_file()}


def read_examples(path, prompt_key: str = "prompt", completion_key: str = "completion") -> list[Example]:
    """Read and validate every line of a JSONL file; raise one DataError listing all problems."""
    path = Path(path)
    lines = _read_lines(path)

    examples = []
    problems = []
    first_kind = None
    first_source = None
    for number, line in lines:
        source = f"{path}:{number}"
        example, problem = _parse_line(line, source, prompt_key, completion_key)
        if problem:
            problems.append(problem)
            continue

        if first_kind is None:
            first_kind, first_source = example.kind, source
        elif example.kind != first_kind:
            problems.append(
                f"{source}: this line is in {example.kind} format but the first example "
                f"({first_source}) is in {first_kind} format. Use one format per file."
            )
            continue
        examples.append(example)

    if not lines:
        problems.append(f"{path}: the file is empty. Add at least one example, one JSON object per line.")

    if problems:
        header = f"{path}: {len(problems)} problems found:" if len(problems) > 1 else None
        raise DataError(cap_problems(problems), header=header)
    return examples


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Return (line number, text) for each non-blank line, accepting a BOM and CRLF endings."""
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}). Pass a readable .jsonl file.") from None
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not valid UTF-8 (byte {error.start}). Save the file as UTF-8."
        ) from None

    # Split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may contain.
    lines = []
    for index, line in enumerate(content.split("\n")):
        line = line.rstrip("\r")
        if line.strip():
            lines.append((index + 1, line))
    return lines


def _parse_line(line: str, source: str, prompt_key: str, completion_key: str):
    """Return (Example, None) for a valid line or (None, problem)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        hint = "Each line must be one complete JSON object."
        if line.strip() in ("[", "{") or line.lstrip().startswith('"'):
            hint = ("The file looks like pretty-printed JSON or a JSON array. Write one object per "
                    "line, for example with: jq -c '.[]' data.json > data.jsonl")
        return None, f"{source}: invalid JSON at column {error.colno}: {error.msg}. {hint}"

    if not isinstance(row, dict):
        return None, f"{source}: expected a JSON object, got {_json_type(row)}. {_shapes(prompt_key, completion_key)}"

    if "messages" in row:
        return _parse_chat(row, source)
    if prompt_key in row or completion_key in row:
        return _parse_completion(row, source, prompt_key, completion_key)
    if "text" in row:
        return _parse_text(row, source)
    if "conversations" in row:
        return None, f"{source}: {_SHAREGPT_HINT}"

    keys = ", ".join(sorted(row)) or "none"
    return None, (f"{source}: no known key (found: {keys}). {_shapes(prompt_key, completion_key)} "
                  f"Set other completions key names with --prompt-key and --completion-key.")


def _shapes(prompt_key: str, completion_key: str) -> str:
    return (
        'Accepted lines: {"messages": [{"role": ..., "content": ...}, ...]} (chat), '
        f'{{"{prompt_key}": ..., "{completion_key}": ...}} (completions) or {{"text": ...}} (text).'
    )

_SHAREGPT_HINT = (
    "ShareGPT format (\"conversations\" with \"from\"/\"value\") is not accepted. Convert each "
    "line to {\"messages\": [...]} with \"role\"/\"content\" keys, mapping from \"human\" to "
    "role \"user\", \"gpt\" to \"assistant\" and \"system\" to \"system\"."
)


def _parse_chat(row: dict, source: str):
    messages = row["messages"]
    if not isinstance(messages, list):
        return None, f"{source}: \"messages\" must be a list of {{\"role\", \"content\"}} objects, got {_json_type(messages)}."
    if not messages:
        return None, f"{source}: \"messages\" is empty. Add at least a user turn and an assistant turn."

    problems = []
    for index, message in enumerate(messages):
        problem = _message_problem(message, index)
        if problem:
            problems.append(problem)
    if problems:
        return None, f"{source}: " + " ".join(problems)

    if not any(message["role"] == "assistant" for message in messages):
        return None, (f"{source}: no assistant turn, so nothing to train on. Add a message with "
                      f"\"role\": \"assistant\", or remove the line.")

    return Example(source, "chat", messages, None, row), None


def _message_problem(message, index: int) -> str | None:
    """Return what is wrong with one chat message, or None."""
    where = f"message {index}"
    if not isinstance(message, dict):
        return f"{where}: expected an object with \"role\" and \"content\", got {_json_type(message)}."
    if "from" in message and "value" in message and "role" not in message:
        return f"{where}: {_SHAREGPT_HINT}"

    role = message.get("role")
    if role is None:
        return f"{where}: missing \"role\". Use one of: {', '.join(ROLES)}."
    if role not in ROLES:
        alias = ROLE_ALIASES.get(role) if isinstance(role, str) else None
        hint = f" Use \"{alias}\" for {role!r}." if alias else ""
        return f"{where}: unknown role {role!r}. Use one of: {', '.join(ROLES)}.{hint}"

    content = message.get("content")
    # An assistant turn that calls tools may leave its content empty.
    if role == "assistant" and message.get("tool_calls") and content is None:
        return None
    if not isinstance(content, str):
        fix = "Join the text parts into one string." if isinstance(content, list) else "Make it a string."
        return f"{where} ({role}): \"content\" must be a string, got {_json_type(content)}. {fix}"
    return None


def _parse_completion(row: dict, source: str, prompt_key: str, completion_key: str):
    problems = []
    for key in (prompt_key, completion_key):
        if key not in row:
            problems.append(f"missing \"{key}\" (the line has {', '.join(sorted(row))}).")
        elif not isinstance(row[key], str):
            problems.append(f"\"{key}\" must be a string, got {_json_type(row[key])}.")
    if problems:
        return None, f"{source}: " + " ".join(problems)

    messages = [
        {"role": "user", "content": row[prompt_key]},
        {"role": "assistant", "content": row[completion_key]},
    ]
    return Example(source, "completions", messages, None, row), None


def _parse_text(row: dict, source: str):
    if not isinstance(row["text"], str):
        return None, f"{source}: \"text\" must be a string, got {_json_type(row['text'])}."
    return Example(source, "text", None, row["text"], row), None


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def cap_problems(problems: list[str]) -> list[str]:
    """Return at most MAX_LISTED_PROBLEMS problems plus a count of the rest."""
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    rest = len(problems) - MAX_LISTED_PROBLEMS
    return problems[:MAX_LISTED_PROBLEMS] + [f"... and {rest} more"]
