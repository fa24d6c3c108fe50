"""`mlxlora data check`: a report on a data set before training on it."""

import json
from pathlib import Path

import click

from mlxlora.config import TrainConfig

LEVEL_STYLES = {"error": "red", "warning": "yellow", "info": "cyan"}
LISTED_SOURCES = 5
LISTED_DETAILS = 5
VERDICTS = {
    0: "no errors or warnings",
    1: "training can proceed, but the warnings deserve a look",
    2: "fix the errors before training",
}


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Load only the tokenizer of a model folder; load a .gguf or Hub model the usual way."""
    from mlxlora.errors import ModelError
    from mlxlora.loading import load_model

    path = Path(spec).expanduser()
    if not path.is_dir():
        return load_model(spec, dequantize=False, trust_remote_code=trust_remote_code).tokenizer

    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    extra = {"trust_remote_code": True} if trust_remote_code else None
    try:
        return mlx_load_tokenizer(path, extra, eos_token_ids=config.get("eos_token_id"))
    except Exception as error:  # AutoTokenizer raises many types for a broken folder.
        raise ModelError(f"--model {spec!r}: loading the tokenizer in {path} failed: "
                         f"{type(error).__name__}: {error}") from error


@click.group("data")
def command() -> None:
    """Inspect training data."""


@command.command("check")
@click.argument("data", type=click.Path())
@click.option("--model", default=None,
              help="Model whose tokenizer and chat template measure token lengths and render "
                   "the examples (Hub id, folder, .gguf file or PACKAGE/FILE.gguf).")
@click.option("--max-seq-length", type=int, default=TrainConfig.max_seq_length,
              show_default=True, help="Maximum tokens per example, as in train.")
@click.option("--long-examples", type=click.Choice(["truncate", "drop"]),
              default=TrainConfig.long_examples, show_default=True,
              help="What training does with longer examples.")
@click.option("--train-on-prompt", is_flag=True, help="Count prompt tokens as trained, as in train.")
@click.option("--prompt-key", default=TrainConfig.prompt_key, show_default=True,
              help="JSON key of the prompt in completions data.")
@click.option("--completion-key", default=TrainConfig.completion_key, show_default=True,
              help="JSON key of the completion in completions data.")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True,
              help="Examples per batch, for the padded tokens per epoch.")
@click.option("--trust-remote-code", is_flag=True, help="Allow tokenizer code from the Hub repo to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def check(data: str, model: str | None, max_seq_length: int, long_examples: str,
          train_on_prompt: bool, prompt_key: str, completion_key: str, batch_size: int,
          trust_remote_code: bool, as_json: bool) -> None:
    """Check DATA (a folder with train.jsonl, valid.jsonl, test.jsonl, or one .jsonl file).

    Reports the format of each file, invalid lines, role order, empty strings, duplicates,
    prompts with several completions, rows shared between splits and, with --model, token
    lengths, truncation and two examples rendered as training encodes them. Exit status: 0 no
    errors or warnings, 1 warnings only, 2 errors (training would fail or train nothing).
    """
    import sys

    from mlxlora.config import validate_ranges
    from mlxlora.data_check import check_data
    from mlxlora.errors import ConfigError

    config = TrainConfig(data=data, max_seq_length=max_seq_length, long_examples=long_examples,
                         train_on_prompt=train_on_prompt, prompt_key=prompt_key,
                         completion_key=completion_key, batch_size=batch_size)
    problems = validate_ranges(config)
    if problems:
        raise ConfigError(problems)

    tokenizer = load_tokenizer(model, trust_remote_code) if model else None
    report = check_data(data, config, tokenizer, label="DATA")

    if as_json:
        click.echo(json.dumps({"model": model, **report.to_dict()}, ensure_ascii=False))
    else:
        for line in describe_report(report, model):
            click.echo(line)
    sys.exit(report.exit_code)


def describe_report(report, model: str | None) -> list[str]:
    """Return the report as terminal lines: splits, findings, renders, verdict."""
    lines = [f"data check of {report.data} (max_seq_length {report.max_seq_length}, "
             f"model: {model or 'none'})", ""]
    for stats in report.splits.values():
        lines += describe_split(stats)

    for finding in report.findings:
        lines += describe_finding(finding)
    for render in report.renders:
        lines += describe_render(render)

    counts = [plural(len(report.at_level(level)), noun)
              for level, noun in (("error", "error"), ("warning", "warning"), ("info", "note"))]
    lines.append(f"{', '.join(counts)}: {VERDICTS[report.exit_code]} "
                 f"(exit status {report.exit_code}).")
    return lines


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def shorten(text: str, edge: int = 40) -> str:
    """Return the text, or its start and end around " ... " when it is long."""
    if len(text) <= 2 * edge + 5:
        return text
    return f"{text[:edge]} ... {text[-edge:]}"


def describe_split(stats) -> list[str]:
    prompts = "" if stats.distinct_prompts is None else f", {stats.distinct_prompts} distinct prompts"
    if stats.format is None:
        return [f"{stats.name}: {stats.path}: not readable, see the errors below", ""]

    lines = [f"{stats.name}: {stats.path}: {stats.format} format, {stats.rows} rows{prompts}"]
    tokens = stats.tokens
    if tokens:
        lines.append(f"  {'tokens':<12}{'min':>8}{'median':>8}{'p90':>8}{'max':>8}{'mean':>8}")
        for part in ("prompt", "completion", "total"):
            if part in tokens:
                d = tokens[part]
                lines.append(f"  {part:<12}{d['min']:>8}{d['median']:>8.0f}{d['p90']:>8.0f}"
                             f"{d['max']:>8}{d['mean']:>8.1f}")
        lines.append(f"  over max_seq_length: {tokens['over_max_seq_length']} rows, "
                     f"{tokens['losing_completion_tokens']} of them losing completion tokens; "
                     f"{tokens['without_trained_tokens']} rows without trained tokens")
        lines.append(f"  per epoch: {tokens['tokens_per_epoch']:,} tokens "
                     f"({tokens['padded_tokens_per_epoch']:,} with padding), "
                     f"{tokens['trained_tokens_per_epoch']:,} trained "
                     f"({100 * tokens['trained_share']:.1f}%)")
    if stats.hints:
        words = stats.hints["completion_words"]
        first = ", ".join(f"{word!r} {count}" for word, count in stats.hints["first_words"])
        lines.append(f"  completions: {words['min']}-{words['max']} words (median "
                     f"{words['median']:.0f}, p90 {words['p90']:.0f}); most common first "
                     f"words: {first}")
    return lines + [""]


def describe_finding(finding) -> list[str]:
    level = click.style(finding.level.upper(), fg=LEVEL_STYLES[finding.level], bold=True)
    where = f" ({finding.split})" if finding.split else ""
    lines = [f"{level} {finding.check}{where}: {finding.message}"]
    for detail in finding.details[:LISTED_DETAILS]:
        lines.append(f"    {detail}")
    if len(finding.details) > LISTED_DETAILS:
        lines.append(f"    ... and {len(finding.details) - LISTED_DETAILS} more (--json lists all)")
    if finding.sources and not finding.details:
        shown = ", ".join(finding.sources[:LISTED_SOURCES])
        rest = len(finding.sources) - LISTED_SOURCES
        lines.append(f"    rows: {shown}" + (f" and {rest} more (--json lists all)" if rest > 0 else ""))
    return lines + [""]


def describe_render(render: dict) -> list[str]:
    spans = " | ".join(repr(shorten(span)) for span in render["trained"])
    lines = [f"--- {render['source']} as training encodes it ({render['tokens']} tokens):",
             render["training_text"], f"--- trained on: {spans}"]
    if render["chat_prompt"] is not None:
        system = " with --system-prompt set to its system message" if render["system_prompt"] else ""
        verdict = "matches" if render["chat_prompt_matches"] else "DOES NOT match"
        lines += [f"--- the prompt `mlxlora chat`{system} builds for its first turn "
                  f"({verdict} the start of the training text):", render["chat_prompt"]]
    return lines + [""]
