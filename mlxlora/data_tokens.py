"""Token-level data checks: lengths, truncation, trained share, and rendered examples.

Examples are encoded with ``mlxlora.prompt``, the code training uses, and chat prompts
with ``mlxlora.inference.prompt_tokens``, the code ``mlxlora chat`` uses, so the report
shows the tokens the model is given.
"""

from mlxlora.batching import batch_indices
from mlxlora.data_check import DataReport, count, distribution, first_prompt
from mlxlora.data_formats import Example
from mlxlora.errors import DataError, ModelError
from mlxlora.memory_plan import batch_width
from mlxlora.prompt import encode_example, fit_length, has_chat_template, no_template_message

RENDERED_EXAMPLES = 2
# Rows whose first prompt is compared with the chat prompt. A mismatch comes from the
# template and tokenizer, not from one row, so the first rows show it.
COMPARED_PROMPTS = 20


def encode_rows(report: DataReport, split: str, examples: list[Example], tokenizer):
    """Encode every row with the prompt left out of the loss; report rows that fail."""
    chats = [example for example in examples if example.kind == "chat"]
    if chats and not has_chat_template(tokenizer):
        file = chats[0].source.rsplit(":", 1)[0]
        report.add("error", "no-chat-template",
                   no_template_message(f"{file} ({len(chats)} chat rows)"), split)
        return []

    encoded = []
    for example in examples:
        try:
            encoded.append(encode_example(example, tokenizer, train_on_prompt=False))
        except DataError as error:
            for problem in error.problems:
                report.add("error", "encode-failed", problem, split, [example.source])
    return encoded


def check_tokens(report: DataReport, split: str, examples: list[Example], tokenizer,
                 config) -> None:
    """Measure token lengths and what fitting to max_seq_length does to each row."""
    encoded = encode_rows(report, split, examples, tokenizer)
    if not encoded:
        return

    limit, policy = config.max_seq_length, config.long_examples
    long, lost, untrainable, kept = [], [], [], []
    for example in encoded:
        if len(example.tokens) > limit:
            long.append(example.source)
            if any(example.mask[limit:]):
                lost.append(example.source)
        fitted = fit_length(example, limit, policy)
        if fitted is None:
            continue
        trained = len(fitted.tokens) - 1 if config.train_on_prompt else fitted.num_targets
        if trained == 0:
            untrainable.append(example.source)
            continue
        kept.append((fitted, trained))

    report.splits[split].tokens = token_stats(encoded, kept, long, lost, untrainable, config,
                                              examples[0].kind)
    report_lengths(report, split, encoded, long, lost, untrainable, kept, config)


def token_stats(encoded, kept, long, lost, untrainable, config, kind: str) -> dict:
    totals = [len(e.tokens) for e in encoded]
    stats = {"total": distribution(totals)}
    if kind != "text":
        stats["completion"] = distribution([e.num_targets for e in encoded])
        stats["prompt"] = distribution([len(e.tokens) - e.num_targets for e in encoded])

    lengths = [len(fitted.tokens) for fitted, _ in kept]
    tokens = sum(lengths)
    trained = sum(count for _, count in kept)
    stats.update({"over_max_seq_length": len(long), "losing_completion_tokens": len(lost),
                  "without_trained_tokens": len(untrainable),
                  "trained_share": trained / tokens if tokens else 0.0,
                  "tokens_per_epoch": tokens, "trained_tokens_per_epoch": trained,
                  "padded_tokens_per_epoch": padded_tokens(lengths, config)})
    return stats


def padded_tokens(lengths: list[int], config) -> int:
    """Return the tokens one epoch feeds the model, padding included, as batches are built."""
    if not lengths:
        return 0
    batches = batch_indices(lengths, config.batch_size, config.seed, epoch=0)
    return sum(len(batch) * batch_width(max(lengths[i] for i in batch), config.max_seq_length)
               for batch in batches)


def report_lengths(report, split, encoded, long, lost, untrainable, kept, config) -> None:
    limit = config.max_seq_length
    if long:
        longest = max(len(e.tokens) for e in encoded)
        fate = "dropped" if config.long_examples == "drop" else "truncated"
        report.add("warning", "too-long",
                   f"{len(long)} of {len(encoded)} rows are longer than max_seq_length "
                   f"{limit} (longest: {longest} tokens), so training {fate} them. Raise "
                   f"--max-seq-length or shorten the rows.", split, long)
    if lost and config.long_examples == "truncate":
        report.add("warning", "lost-targets",
                   f"{count(len(lost), 'truncated row loses', 'truncated rows lose')} completion "
                   f"tokens or their EOS, so the model learns answers that stop mid-way. Use --long-examples drop or "
                   f"raise --max-seq-length.", split, lost)
    if untrainable:
        level = "error" if not kept else "warning"
        effect = "nothing is left to train" if not kept else "training skips them"
        report.add(level, "no-targets",
                   f"{count(len(untrainable), 'row has', 'rows have')} no trained token after "
                   f"fitting to max_seq_length {limit}, so {effect}. Check for empty completions or "
                   f"raise --max-seq-length.", split, untrainable)


def trained_spans(tokenizer, tokens: list[int], mask: list[bool]) -> list[str]:
    """Return the decoded text of each run of trained tokens."""
    spans, start = [], None
    for position, trained in enumerate(mask + [False]):
        if trained and start is None:
            start = position
        elif not trained and start is not None:
            spans.append(tokenizer.decode(tokens[start:position]))
            start = None
    return spans


def chat_prompt(example: Example, tokenizer) -> list[int] | None:
    """Return the tokens `mlxlora chat` sends for the example's first turn, None for text."""
    from mlxlora.inference import prompt_tokens

    if example.kind == "text":
        return None
    try:
        return prompt_tokens(tokenizer, first_prompt(example))
    except ModelError:
        return None


def render_examples(report: DataReport, examples: list[Example], tokenizer, config) -> None:
    """Render the first rows as training encodes them, beside the matching chat prompt."""
    if any(e.kind == "chat" for e in examples) and not has_chat_template(tokenizer):
        return

    mismatched = []
    for index, example in enumerate(examples[:COMPARED_PROMPTS]):
        try:
            encoded = encode_example(example, tokenizer, config.train_on_prompt)
        except DataError:
            continue
        prompt = chat_prompt(example, tokenizer)
        matches = None if prompt is None else encoded.tokens[:len(prompt)] == prompt
        if matches is False:
            mismatched.append(example.source)
        if len(report.renders) < RENDERED_EXAMPLES:
            report.renders.append(render(example, encoded, prompt, matches, tokenizer, config))

    if mismatched:
        report.add("warning", "prompt-mismatch",
                   f"{len(mismatched)} of the first {min(len(examples), COMPARED_PROMPTS)} rows "
                   f"start with other tokens than the prompt `mlxlora chat` builds for their "
                   f"first turn, so the adapter sees different prompts at inference. Compare "
                   f"the rendered examples.", "train", mismatched)


def render(example: Example, encoded, prompt, matches, tokenizer, config) -> dict:
    fitted = fit_length(encoded, config.max_seq_length, "truncate")
    messages = example.messages or []
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    return {"source": example.source, "tokens": len(fitted.tokens),
            "training_text": tokenizer.decode(fitted.tokens),
            "trained": trained_spans(tokenizer, fitted.tokens, fitted.mask),
            "chat_prompt": None if prompt is None else tokenizer.decode(prompt),
            "chat_prompt_matches": matches, "system_prompt": system}
