"""Check a data set before training: format, consistency, token lengths and rendering.

``read_examples`` already rejects lines that cannot be trained, and this module turns those
problems into error findings. It adds the findings that do not stop training but change
what the adapter learns: role order, empty strings, duplicates, one prompt with several
completions, overlap between splits, truncation, and the tokens the model is given.

Errors mean training would fail or train nothing; warnings deserve a look.
"""

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlxlora.config import TrainConfig
from mlxlora.data_formats import SPLIT_NAMES, Example, find_splits, read_examples
from mlxlora.errors import DataError

logger = logging.getLogger("mlxlora")

LEVELS = ("error", "warning", "info")
EXIT_CODES = {"error": 2, "warning": 1}

# read_examples problems, classified by a phrase of their message.
READ_PROBLEM_CHECKS = (
    ("format but the first example", "mixed-formats"),
    ("ShareGPT", "sharegpt-format"),
    ("unknown role", "unknown-role"),
)

# Findings that load_splits also logs, from the encoded splits' summaries.
TRAINING_LOGGED_CHECKS = ("too-long", "lost-targets", "no-targets")

SHORT_COMPLETION_WORDS = 2
FIRST_WORDS = 5
PREVIEW_CHARS = 60


@dataclass
class Finding:
    """One result of the check: an error, a warning or an informational note.

    ``sources`` names the rows involved as file:line; ``details`` contains extra lines such as
    the groups of a duplicate finding.
    """

    level: str
    check: str
    message: str
    split: str | None = None
    sources: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass
class SplitStats:
    """Measurements of one split."""

    name: str
    path: str
    format: str | None = None
    rows: int = 0
    distinct_prompts: int | None = None
    tokens: dict | None = None
    hints: dict | None = None


@dataclass
class DataReport:
    """Every finding and measurement of a data check."""

    data: str
    max_seq_length: int
    splits: dict[str, SplitStats] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    renders: list[dict] = field(default_factory=list)

    def add(self, level: str, check: str, message: str, split: str | None = None,
            sources: list[str] | None = None, details: list[str] | None = None) -> None:
        self.findings.append(Finding(level, check, message, split, sources or [], details or []))

    def at_level(self, level: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.level == level]

    @property
    def errors(self) -> list[Finding]:
        return self.at_level("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.at_level("warning")

    @property
    def exit_code(self) -> int:
        """Return 2 when there are errors, 1 for warnings only, else 0."""
        for level in ("error", "warning"):
            if self.at_level(level):
                return EXIT_CODES[level]
        return 0

    def to_dict(self) -> dict:
        return {"data": self.data, "max_seq_length": self.max_seq_length,
                "splits": {name: asdict(stats) for name, stats in self.splits.items()},
                "findings": [asdict(finding) for finding in self.findings],
                "renders": self.renders, "exit_code": self.exit_code}


def check_data(data: str, config: TrainConfig | None = None, tokenizer=None,
               split_names: tuple[str, ...] = SPLIT_NAMES, label: str = "--data") -> DataReport:
    """Check the splits of ``data`` and return the report.

    ``config`` supplies prompt_key, completion_key, max_seq_length, long_examples,
    train_on_prompt and batch_size. Token lengths and renders need ``tokenizer`` (an mlx-lm
    TokenizerWrapper). Raises DataError only when ``data`` itself is not found, naming it
    as ``label``.
    """
    config = config or TrainConfig()
    report = DataReport(str(data), config.max_seq_length)
    splits = read_splits(report, find_splits(data, label), config, split_names)

    for name, examples in splits.items():
        check_roles(report, name, examples)
        check_empty_strings(report, name, examples, config)
        check_consistency(report, name, examples)
    check_leakage(report, splits)

    if tokenizer is None:
        report.add("info", "no-model", "Token lengths, truncation and rendering were not "
                   "checked. Pass --model to check them with that model's tokenizer.")
    else:
        from mlxlora.data_tokens import check_tokens, render_examples

        for name, examples in splits.items():
            check_tokens(report, name, examples, tokenizer, config)
        if "train" in splits:
            render_examples(report, splits["train"], tokenizer, config)

    if "train" in splits:
        add_hints(report, splits["train"])
    return report


def read_splits(report: DataReport, paths: dict[str, Path], config,
                split_names: tuple[str, ...]) -> dict[str, list[Example]]:
    """Read each split; turn a split's reading problems into error findings."""
    splits = {}
    for name, path in paths.items():
        if name not in split_names:
            continue
        stats = SplitStats(name, str(path))
        report.splits[name] = stats
        try:
            examples = read_examples(path, config.prompt_key, config.completion_key)
        except DataError as error:
            for problem in error.problems:
                report.add("error", read_problem_check(problem), problem, name,
                           [problem.split(": ", 1)[0]] if re.match(r"\S+:\d+: ", problem) else [])
            continue

        stats.format, stats.rows = examples[0].kind, len(examples)
        if examples[0].kind != "text":
            stats.distinct_prompts = len({_json(first_prompt(e)) for e in examples})
        splits[name] = examples
    return splits


def read_problem_check(problem: str) -> str:
    for phrase, check in READ_PROBLEM_CHECKS:
        if phrase in problem:
            return check
    return "invalid-line"


def count(number: int, singular: str, plural: str | None = None) -> str:
    """Return "1 row" or "2 rows"; ``plural`` defaults to the singular plus "s"."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def normalise(text: str) -> str:
    """Lower-case the text and collapse runs of whitespace to one space."""
    return " ".join(text.lower().split())


def first_prompt(example: Example) -> list[dict]:
    """Return the messages before the first trained assistant turn."""
    return next(prompt for prompt, _ in target_turns(example))


def target_turns(example: Example):
    """Yield (messages before, assistant content) for every trained assistant turn.

    An assistant message at position 0 is context, not a target, as in training.
    """
    for index, message in enumerate(example.messages or []):
        if message["role"] == "assistant" and index > 0:
            yield example.messages[:index], message.get("content") or ""


def role_problem(messages: list[dict]) -> tuple[str, str] | None:
    """Return (check, description) for the first role-order problem of a conversation."""
    roles = [message["role"] for message in messages]
    if "system" in roles[1:]:
        return "late-system", f"a system message at position {roles.index('system', 1)}"

    spoken = [role for role in roles if role != "system"]
    if spoken and spoken[0] == "assistant":
        return "assistant-first", "the first turn is the assistant's"
    for index in range(1, len(roles)):
        if roles[index] == roles[index - 1] and roles[index] in ("user", "assistant"):
            return "repeated-role", f"two {roles[index]} turns in a row (messages {index - 1} and {index})"
    return None


ROLE_ADVICE = {
    "late-system": ("with a system message after the first position. Many chat templates "
                    "accept a system message only first; move it there or drop it."),
    "assistant-first": ("with an assistant turn first. That turn has no prompt, so it stays "
                        "context and is not trained; start with the user turn it answers."),
    "repeated-role": ("with two turns of the same role in a row. Many chat templates reject "
                      "this and the model never sees it in chat; merge the turns or add the "
                      "missing reply."),
}


def check_roles(report: DataReport, split: str, examples: list[Example]) -> None:
    problems = defaultdict(list)
    for example in examples:
        if example.kind != "chat":
            continue
        problem = role_problem(example.messages)
        if problem:
            problems[problem[0]].append((example.source, problem[1]))

    for check, rows in problems.items():
        report.add("warning", check, f"{count(len(rows), 'conversation')} {ROLE_ADVICE[check]}", split,
                   [source for source, _ in rows],
                   [f"{source}: {description}" for source, description in rows])


def empty_fields(example: Example, config) -> list[str]:
    """Return the names of the example's empty or whitespace-only strings."""
    if example.kind == "text":
        return ["text"] if not example.text.strip() else []
    if example.kind == "completions":
        keys = (config.prompt_key, config.completion_key)
        return [key for key in keys if not example.raw[key].strip()]
    return [f"{message['role']} content" for message in example.messages
            if isinstance(message.get("content"), str) and not message["content"].strip()
            and not message.get("tool_calls")]


def check_empty_strings(report: DataReport, split: str, examples: list[Example], config) -> None:
    rows = defaultdict(list)
    for example in examples:
        for name in empty_fields(example, config):
            rows[name].append(example.source)

    for name, sources in rows.items():
        effect = ("teaches the model to answer with nothing" if name in
                  (config.completion_key, "assistant content", "text")
                  else "gives the model no context to answer from")
        report.add("warning", "empty-string",
                   f"{count(len(sources), 'row has', 'rows have')} an empty {name}, which "
                   f"{effect}. Fill it in or remove the rows.", split, sources)


def example_key(example: Example, normalised: bool = False) -> str:
    """Return a key that is equal for equal examples, optionally after normalise()."""
    if example.kind == "text":
        return normalise(example.text) if normalised else _json(example.raw)
    if not normalised:
        return _json(example.raw)
    return _json([[m["role"], normalise(m.get("content") or "")] for m in example.messages])


def _groups(examples: list[Example], key) -> list[list[Example]]:
    groups = defaultdict(list)
    for example in examples:
        groups[key(example)].append(example)
    return [group for group in groups.values() if len(group) > 1]


def _listing(sources: list[str], shown: int = 5) -> str:
    rest = len(sources) - shown
    return ", ".join(sources[:shown]) + (f" and {rest} more" if rest > 0 else "")


def preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 3] + "..."


def check_consistency(report: DataReport, split: str, examples: list[Example]) -> None:
    """Find exact duplicates, near-duplicates and prompts with several completions."""
    exact = sorted(_groups(examples, example_key), key=len, reverse=True)
    if exact:
        copies = [e.source for group in exact for e in group[1:]]
        report.add("warning", "duplicates",
                   f"{count(len(copies), 'row is an exact copy', 'rows are exact copies')} of "
                   f"an earlier row ({count(len(exact), 'group')}), so the copies weigh more in "
                   f"training. Remove the copies unless you want that weight.", split, copies,
                   [f"{group[0].source} x{len(group)}: {_listing([e.source for e in group[1:]])}"
                    for group in exact])

    # A near-duplicate group contains several exact variants; each variant after the first
    # counts once, so exact copies are not reported twice.
    near = []
    for group in _groups(examples, lambda e: example_key(e, True)):
        variants = {}
        for example in group:
            variants.setdefault(example_key(example), example)
        if len(variants) > 1:
            near.append(list(variants.values()))
    if near:
        rows = [e.source for variants in near for e in variants[1:]]
        report.add("warning", "near-duplicates",
                   f"{count(len(rows), 'row equals', 'rows equal')} an earlier row once case "
                   f"and whitespace are ignored ({count(len(near), 'group')}). Keep one of each "
                   f"unless the differences matter.", split, rows,
                   [_listing([e.source for e in variants]) for variants in near])

    check_same_prompt(report, split, examples)


def check_same_prompt(report: DataReport, split: str, examples: list[Example]) -> None:
    """Report prompts answered by more than one different completion."""
    answers = defaultdict(list)
    for example in examples:
        for prompt, completion in target_turns(example):
            answers[_json(prompt)].append((example.source, completion))

    groups = [(json.loads(key), rows) for key, rows in answers.items()
              if len({completion for _, completion in rows}) > 1]
    if not groups:
        return
    groups.sort(key=lambda group: len(group[1]), reverse=True)

    rows = sum(len(group) for _, group in groups)
    most = max(len({completion for _, completion in group}) for _, group in groups)
    details = []
    for prompt, group in groups:
        distinct = len({completion for _, completion in group})
        details.append(f"\"{preview(prompt[-1]['content'])}\": {len(group)} rows, {distinct} "
                       f"different completions ({_listing([s for s, _ in group], 3)})")
    report.add("warning", "same-prompt",
               f"{count(len(groups), 'prompt has', 'prompts have')} more than one different "
               f"completion ({count(rows, 'row')}, up to {most} completions for one prompt). "
               f"They are contradictions or paraphrases: read them and decide which to keep.",
               split,
               [source for _, group in groups for source, _ in group], details)


def check_leakage(report: DataReport, splits: dict[str, list[Example]]) -> None:
    """Report valid and test rows that also appear in train, or whose prompt does."""
    if "train" not in splits:
        return
    train_rows = {example_key(e, True) for e in splits["train"]}
    train_prompts = {_json(p) for e in splits["train"] for p, _ in target_turns(e)}

    for name in ("valid", "test"):
        examples = splits.get(name, [])
        leaked = [e.source for e in examples if example_key(e, True) in train_rows]
        if leaked:
            report.add("warning", "leakage",
                       f"{len(leaked)} of {len(examples)} {name} rows also appear in train "
                       f"(ignoring case and whitespace), so the {name} loss overstates how "
                       f"well the adapter generalises. Remove them from one of the splits.",
                       name, leaked)

        shared = [e.source for e in examples if e.source not in leaked
                  and any(_json(p) in train_prompts for p, _ in target_turns(e))]
        if shared:
            report.add("info", "shared-prompts",
                       f"{len(shared)} of {len(examples)} {name} rows share a prompt (the "
                       f"messages before an assistant turn) with train, so the {name} loss "
                       f"partly measures recall of training answers, not generalisation.",
                       name, shared)


def distribution(values: list[float]) -> dict:
    """Return min, median, 90th percentile, max and mean of the values."""
    array = np.asarray(values, dtype=np.float64)
    return {"min": int(array.min()), "median": float(np.median(array)),
            "p90": float(np.percentile(array, 90)), "max": int(array.max()),
            "mean": float(array.mean())}


def add_hints(report: DataReport, examples: list[Example]) -> None:
    """Describe the training completions: length spread, first words and very short ones."""
    completions = [(e.source, text) for e in examples for _, text in target_turns(e)]
    if not completions:
        return

    words = [len(text.split()) for _, text in completions]
    first = Counter(text.split()[0] for _, text in completions if text.split())
    hints = {"completion_words": distribution(words),
             "first_words": [[word, count] for word, count in first.most_common(FIRST_WORDS)]}
    report.splits["train"].hints = hints

    short = [source for (source, _), count in zip(completions, words)
             if count <= SHORT_COMPLETION_WORDS]
    if short:
        report.add("info", "short-completions",
                   f"{len(short)} of {len(completions)} completions have "
                   f"{SHORT_COMPLETION_WORDS} words or fewer. Fine for labels; for a "
                   f"conversational adapter they teach terse answers.", "train", short)


def check_before_training(config, tokenizer) -> DataReport:
    """Run the check on the train and valid splits; raise DataError listing its errors.

    Warnings are logged one line each. ``mlxlora train`` calls this unless
    skip_data_check is set.
    """
    report = check_data(config.data, config, tokenizer, split_names=("train", "valid"))
    if report.errors:
        raise DataError([finding.message for finding in report.errors],
                        header=f"The data check found {count(len(report.errors), 'error')}, so "
                               f"training did not start (`mlxlora data check {config.data}` "
                               f"shows the whole report):")
    for finding in report.warnings:
        # Training logs its own lines about truncation and rows without targets.
        if finding.check not in TRAINING_LOGGED_CHECKS:
            logger.warning("data check (%s): %s %s", finding.split, finding.message,
                           _listing(finding.sources, 3))
    return report
