"""`mlxlora eval`: test loss, perplexity and answer matches, base model beside the adapter."""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import click

from mlxlora.commands.chat import model_options
from mlxlora.errors import ConfigError, DataError

logger = logging.getLogger("mlxlora")

RUN_CONFIG_FILE = "training_config.json"
# Settings that change which tokens count in the loss, taken from the training run when
# known, so that eval reproduces its validation numbers.
ENCODING_FIELDS = ("max_seq_length", "long_examples", "train_on_prompt", "prompt_key",
                   "completion_key", "batch_size")
MISMATCHES_SHOWN = 3


@dataclass
class Reference:
    """A test example's prompt and the answer the data expects for it."""

    source: str
    prompt: list[dict]
    expected: str


@dataclass
class MatchResult:
    matched: int
    total: int
    mismatches: list[tuple[str, str, str]]

    def describe(self) -> str:
        return f"{self.matched}/{self.total} ({100 * self.matched / max(self.total, 1):.1f}%)"


def run_config(adapter_path: str | None) -> dict:
    """Return the training config saved with the adapter's run, or {} when there is none.

    An adapter folder is the run folder itself, its best/ folder, or one of its
    checkpoints/step-N folders.
    """
    if adapter_path is None:
        return {}
    folder = Path(adapter_path)
    candidates = [folder]
    if folder.name == "best":
        candidates.append(folder.parent)
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent)

    for candidate in candidates:
        path = candidate / RUN_CONFIG_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")).get("config", {})
            except (OSError, json.JSONDecodeError, AttributeError) as error:
                logger.warning("%s is unreadable, so the training settings are unknown: %s",
                               path, error)
                return {}
    return {}


def eval_config(training: dict, max_seq_length: int | None, batch_size: int | None):
    """Return a TrainConfig with the run's encoding settings and the options given here."""
    from mlxlora.config import TrainConfig

    values = {name: training[name] for name in ENCODING_FIELDS if name in training}
    if max_seq_length is not None:
        values["max_seq_length"] = max_seq_length
    if batch_size is not None:
        values["batch_size"] = batch_size
    config = dataclasses.replace(TrainConfig(), **values)

    problems = []
    if config.max_seq_length < 2:
        problems.append(f"--max-seq-length {config.max_seq_length}: must be at least 2")
    if config.batch_size < 1:
        problems.append(f"--batch-size {config.batch_size}: must be at least 1")
    if problems:
        raise ConfigError(problems)
    return config


def find_test_file(data: str | None, training: dict) -> Path:
    """Return the file to evaluate: --data itself, test.jsonl in --data, or in the run's data."""
    if data is None:
        data = training.get("data")
        if data is None:
            raise ConfigError("--data is missing, and no training run with a data folder was "
                              "found beside the adapter. Pass --data FOLDER (with test.jsonl) "
                              "or --data FILE.jsonl.")
        if not Path(data).exists():
            raise ConfigError(f"The training run's data {data} is not found from this folder "
                              "(a relative path is relative to where training ran). Pass "
                              "--data FOLDER (with test.jsonl) or --data FILE.jsonl.")
        logger.info("data: %s, from the training run", data)

    path = Path(data)
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(f"--data {data}: not a .jsonl file. Pass a JSONL file or a folder "
                              "with test.jsonl.")
        return path
    if not path.is_dir():
        raise ConfigError(f"--data {data}: not found. Pass a folder with test.jsonl or a .jsonl file.")

    test = path / "test.jsonl"
    if not test.is_file():
        present = ", ".join(sorted(p.name for p in path.glob("*.jsonl"))) or "no .jsonl files"
        raise ConfigError(f"--data {data}: test.jsonl not found (the folder contains {present}). "
                          f"Pass the file to evaluate, e.g. --data {path / 'valid.jsonl'}.")
    return test


def references(examples) -> list[Reference]:
    """Return the prompt and expected answer of each example; raise DataError for text data."""
    if examples and examples[0].kind == "text":
        raise DataError(f"{examples[0].source.rsplit(':', 1)[0]}: text rows have no separate "
                        "answer to match. Use --no-generate, or chat or completions data.")

    found = []
    for example in examples:
        messages = example.messages
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        expected = messages[last].get("content")
        # A conversation that opens with the assistant, or ends in a tool call, has no
        # prompt or no text answer to compare.
        if last == 0 or not isinstance(expected, str):
            continue
        found.append(Reference(example.source, messages[:last], expected))
    return found


def is_match(answer: str, expected: str, mode: str) -> bool:
    """exact: equal after stripping whitespace; contains: the stripped expected text occurs."""
    if mode == "exact":
        return answer.strip() == expected.strip()
    return expected.strip() in answer


def match_answers(loaded, items: list[Reference], mode: str, max_tokens: int) -> MatchResult:
    from mlxlora.inference import GenerationSettings, generate_answer

    settings = GenerationSettings(temp=0.0, max_tokens=max_tokens, seed=0)
    matched, mismatches = 0, []
    for item in items:
        answer = generate_answer(loaded, item.prompt, settings).text
        if is_match(answer, item.expected, mode):
            matched += 1
        else:
            mismatches.append((item.source, item.expected, answer))
    return MatchResult(matched, len(items), mismatches)


def evaluate_side(loaded, name: str, split, items, mode, max_tokens, batch_size) -> dict:
    """Return the loss result and the match result of one side ("base" runs with adapters off)."""
    from contextlib import nullcontext

    from mlxlora.inference import adapters_disabled, split_loss

    context = adapters_disabled(loaded.model) if name == "base" else nullcontext()
    with context:
        logger.info("%s: computing the loss", name)
        result = {"loss": split_loss(loaded.model, loaded.tokenizer, split.examples, batch_size)}
        if items is not None:
            logger.info("%s: generating %d answers", name, len(items))
            result["match"] = match_answers(loaded, items, mode, max_tokens)
    return result


def print_table(path: Path, results: dict, mode: str) -> None:
    first = next(iter(results.values()))
    loss = first["loss"]
    click.echo(f"{path}: {loss.num_examples} examples, {loss.num_targets:,} target tokens")

    rows = [("", list(results)),
            ("loss", [f"{r['loss'].loss:.4f}" for r in results.values()]),
            ("perplexity", [f"{r['loss'].perplexity:.3f}" for r in results.values()])]
    if "match" in first:
        rows.append((f"{mode} match", [r["match"].describe() for r in results.values()]))

    for label, values in rows:
        click.echo(f"{label:<16}" + "".join(f"{value:>18}" for value in values))


def log_mismatches(name: str, match: MatchResult) -> None:
    for source, expected, answer in match.mismatches[:MISMATCHES_SHOWN]:
        logger.info("%s mismatch at %s: expected %r, got %r", name, source, expected, answer)


@click.command("eval")
@model_options
@click.option("--data", default=None,
              help="Folder with test.jsonl, or the .jsonl file to evaluate. Default: the data "
                   "folder of the adapter's training run.")
@click.option("--max-seq-length", type=int, default=None,
              help="Maximum tokens per example. Default: the training run's value, else 2048.")
@click.option("--batch-size", type=int, default=None,
              help="Examples per loss batch. Default: the training run's value, else 4.")
@click.option("--generate/--no-generate", "generate", default=None,
              help="Also generate each answer greedily and match it against the data's answer. "
                   "Default: on when --match is given.")
@click.option("--match", "mode", type=click.Choice(["exact", "contains"]), default=None,
              help="exact: the answer equals the expected one (whitespace stripped); contains: "
                   "the expected answer occurs in it.  [default: exact]")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N examples.")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="Maximum tokens per generated answer.")
def command(model, adapter_path, data, max_seq_length, batch_size, generate, mode, limit,
            max_tokens) -> None:
    """Compute test loss and perplexity as training's validation does, base beside adapter.

    The loss uses the training run's masking and length settings (saved beside the adapter),
    so the same data gives the same number as the validation loss during training.
    """
    from mlxlora.data_formats import read_examples
    from mlxlora.inference import load_for_inference
    from mlxlora.prompt import encode_split

    generate = generate if generate is not None else mode is not None
    mode = mode or "exact"
    problems = []
    if limit is not None and limit < 1:
        problems.append(f"--limit {limit}: must be at least 1")
    if max_tokens < 1:
        problems.append(f"--max-tokens {max_tokens}: must be at least 1")
    if problems:
        raise ConfigError(problems)

    training = run_config(adapter_path)
    config = eval_config(training, max_seq_length, batch_size)
    path = find_test_file(data, training)
    examples = read_examples(path, config.prompt_key, config.completion_key)[:limit]
    items = references(examples) if generate else None

    loaded = load_for_inference(model, adapter_path)
    split = encode_split(examples, loaded.tokenizer, config)
    for line in split.summary.describe():
        logger.info("data: %s", line)

    names = ("base", "adapter") if loaded.has_adapter else ("model",)
    results = {name: evaluate_side(loaded, name, split, items, mode, max_tokens, config.batch_size)
               for name in names}
    if generate:
        for name, result in results.items():
            log_mismatches(name, result["match"])
    print_table(path, results, mode)
