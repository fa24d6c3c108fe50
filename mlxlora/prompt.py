"""Render conversations into tokens and training masks, shared by training and chat.

``encode_prompt`` defines the tokens that chat feeds the model. ``encode_example`` renders a
training example with the same chat template, tokenizer call and BOS rule, so the prompt part
of every training sequence equals what chat produces for that conversation.

Masks mark training targets: ``mask[j]`` is True when token ``j`` is predicted from the tokens
before it and counts in the loss.
"""

from dataclasses import dataclass

import jinja2

from mlxlora.data_formats import Example, cap_problems
from mlxlora.errors import DataError, ModelError


@dataclass
class EncodedExample:
    """Tokens of one example and, for each token, whether it is a training target."""

    tokens: list[int]
    mask: list[bool]
    source: str

    @property
    def num_targets(self) -> int:
        return sum(self.mask)


def has_chat_template(tokenizer) -> bool:
    if hasattr(tokenizer, "has_chat_template"):
        return bool(tokenizer.has_chat_template)
    return getattr(tokenizer, "chat_template", None) is not None


def eos_token_ids(tokenizer) -> set[int]:
    """Return every token id that ends a turn: mlx-lm's eos_token_ids, else the EOS id."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def uses_bos(tokenizer) -> bool:
    """Return whether the tokenizer's plain encode starts a text with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer.encode("a")[:1] == [bos]


def encode_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                  tools: list[dict] | None = None) -> list[int]:
    """Encode a conversation into the tokens that chat feeds the model.

    With a chat template, this is the rendered conversation plus, by default, the header of
    the assistant's reply. A model without a chat template gets the plain text of a single
    user message, the same layout that completions training uses for such a model.
    """
    if has_chat_template(tokenizer):
        text = render_chat(tokenizer, messages, add_generation_prompt, tools)
        return with_single_bos(tokenizer, encode_text(tokenizer, text))

    if len(messages) == 1 and messages[0].get("role") == "user":
        return with_single_bos(tokenizer, encode_text(tokenizer, messages[0]["content"]))
    raise ModelError(
        "This model has no chat template, so it can continue a single prompt but cannot "
        "render a conversation. Use a chat or instruct model for multi-turn chat."
    )


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """Render messages to text with the tokenizer's chat template."""
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenize text without adding BOS or EOS; special-token strings in it become their ids."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def with_single_bos(tokenizer, tokens: list[int]) -> list[int]:
    """Return tokens that start with exactly one BOS when the tokenizer uses one.

    A template that writes the BOS string already produced it. Otherwise the BOS is added
    when the tokenizer's plain encode would add it. Repeated leading BOS tokens are merged.
    """
    removed, add_bos = _bos_change(tokenizer, tokens)
    return [tokenizer.bos_token_id] * add_bos + tokens[removed:]


def _bos_change(tokenizer, tokens: list[int]) -> tuple[int, bool]:
    """Return how many leading BOS tokens to remove and whether to put one BOS back."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return 0, False

    leading = 0
    while leading < len(tokens) and tokens[leading] == bos:
        leading += 1
    return leading, leading > 0 or uses_bos(tokenizer)


def encode_example(example: Example, tokenizer, train_on_prompt: bool = False) -> EncodedExample:
    """Encode one example into tokens and a target mask; raise DataError if it cannot be.

    Chat and completions examples are rendered with the chat template and train on every
    assistant turn, each ending with one EOS. Text examples train on every token plus an
    appended EOS.
    """
    if example.kind == "text":
        tokens = encode_text(tokenizer, example.text) + [_eos_id(tokenizer)]
        mask = [True] * len(tokens)
    elif has_chat_template(tokenizer):
        tokens, mask = _encode_with_template(example, tokenizer, train_on_prompt)
    elif example.kind == "completions":
        tokens, mask = _encode_plain_completion(example, tokenizer, train_on_prompt)
    else:
        raise DataError(no_template_message(example.source))

    return _finish(tokenizer, tokens, mask, example.source)


def no_template_message(source: str) -> str:
    return (
        f"{source}: chat data needs a chat template, and this model's tokenizer has none. "
        f"Use a chat or instruct model, or convert the data to text format "
        f"({{\"text\": ...}}) with your own prompt layout."
    )


def _finish(tokenizer, tokens: list[int], mask: list[bool], source: str) -> EncodedExample:
    """Apply the BOS rule and unmark position 0, which no earlier token can predict."""
    removed, add_bos = _bos_change(tokenizer, tokens)
    tokens = [tokenizer.bos_token_id] * add_bos + tokens[removed:]
    mask = [False] * add_bos + mask[removed:]

    if mask:
        mask[0] = False
    return EncodedExample(tokens, mask, source)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    ids = eos_token_ids(tokenizer)
    if not ids:
        raise ModelError(
            "The tokenizer has no EOS token, so the model could not learn where to stop. "
            "Use a tokenizer that defines eos_token."
        )
    return min(ids)


def _encode_plain_completion(example: Example, tokenizer, train_on_prompt: bool):
    """Encode prompt text directly followed by completion text and EOS, without a template."""
    prompt = example.messages[0]["content"]
    completion = example.messages[1]["content"]
    prompt_tokens, completion_tokens = _encode_pieces(tokenizer, [prompt, prompt + completion])

    tokens = prompt_tokens + completion_tokens + [_eos_id(tokenizer)]
    mask = [train_on_prompt] * len(prompt_tokens) + [True] * (len(completion_tokens) + 1)
    return tokens, mask


def _encode_with_template(example: Example, tokenizer, train_on_prompt: bool):
    """Encode a conversation so that every assistant turn is a target.

    For each assistant turn i, the prompt is the render of messages[:i] with the generation
    prompt, which is what encode_prompt gives chat, and the turn is what the render of
    messages[:i+1] adds to it.
    """
    renders = _cumulative_renders(example, tokenizer)
    pieces = _encode_pieces(tokenizer, renders)
    eos_ids = eos_token_ids(tokenizer)

    tokens, mask = [], []
    # Tokens that the template puts after an end-of-turn open the next prompt, so they are
    # not targets.
    carried = []
    for index in range(0, len(pieces), 2):
        prompt = carried + pieces[index]
        target, carried = _split_turn_end(pieces[index + 1], eos_ids, tokenizer)
        tokens += prompt + target
        mask += [train_on_prompt] * len(prompt) + [True] * len(target)

    # What follows the final end-of-turn belongs to a prompt that never comes, so it is dropped.
    return tokens, mask


def _cumulative_renders(example: Example, tokenizer) -> list[str]:
    """Return the renders before and after each assistant turn, checking each extends the last."""
    messages = example.messages
    tools = example.raw.get("tools") if example.kind == "chat" else None
    if not isinstance(tools, list):
        tools = None

    renders = []
    for index, message in enumerate(messages):
        # An opening assistant message has no prompt to answer (and many templates fail to
        # render an empty one), so it stays context and is not a target.
        if message["role"] != "assistant" or index == 0:
            continue
        for count, generation_prompt in ((index, True), (index + 1, False)):
            text = _render_or_raise(example, tokenizer, messages[:count], generation_prompt, tools)
            if renders and not text.startswith(renders[-1]):
                raise DataError(_not_prefix_message(example.source, count))
            renders.append(text)
    return renders


def _render_or_raise(example, tokenizer, messages, generation_prompt, tools) -> str:
    try:
        return render_chat(tokenizer, messages, generation_prompt, tools)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as error:
        raise DataError(
            f"{example.source}: the model's chat template failed on the first "
            f"{len(messages)} messages of this conversation: {error}. Fix the conversation "
            f"(for example the order of roles) to what this template accepts."
        ) from None


def _not_prefix_message(source: str, count: int) -> str:
    return (
        f"{source}: the model's chat template is not prefix-consistent. The render of the "
        f"first {count} messages does not start with the render of the messages before it, "
        f"so the training tokens could not match the prompt that chat builds (templates that "
        f"rewrite earlier turns, such as dropping their reasoning, do this). Split the "
        f"conversation into single-turn examples, or convert it to text format."
    )


def _encode_pieces(tokenizer, renders: list[str]) -> list[list[int]]:
    """Tokenize each render's extension of the previous render.

    Each piece is the part of encode(render) beyond encode(previous render), so the tokens
    equal those of encoding the whole text at once. Where a token spans the boundary (the two
    encodings disagree), the added text is encoded on its own instead.
    """
    pieces = []
    previous_text, previous_tokens = "", []
    for text in renders:
        tokens = encode_text(tokenizer, text)
        if tokens[: len(previous_tokens)] == previous_tokens:
            pieces.append(tokens[len(previous_tokens):])
        else:
            # NOTE: a token merges across this boundary, so here the training tokens differ
            # from the ones encode_prompt gives for the same conversation.
            pieces.append(encode_text(tokenizer, text[len(previous_text):]))
        previous_text, previous_tokens = text, tokens
    return pieces


def _split_turn_end(turn: list[int], eos_ids: set[int], tokenizer):
    """Split an assistant turn into its targets, ending with one EOS, and the tokens after it."""
    for position in range(len(turn) - 1, -1, -1):
        if turn[position] in eos_ids:
            return turn[: position + 1], turn[position + 1:]
    return turn + [_eos_id(tokenizer)], []


@dataclass
class SplitSummary:
    """Changes that encoding made to a split, each example named by file:line.

    ``long`` lists examples over max_seq_length, ``lost_targets`` the truncated ones that
    lost completion tokens or their EOS, ``dropped`` those removed by the "drop" policy and
    ``untrainable`` those skipped because no target was left. ``longest`` is the token
    count of the longest example before fitting.
    """

    total: int
    max_seq_length: int
    longest: int
    long: list[str]
    lost_targets: list[str]
    dropped: list[str]
    untrainable: list[str]

    def describe(self, listed: int = 5) -> list[str]:
        """Return log lines for the changes, naming up to ``listed`` examples each."""
        lines = []
        if self.long:
            lines.append(f"{len(self.long)} of {self.total} examples are longer than "
                         f"max_seq_length {self.max_seq_length} (longest: {self.longest} tokens; "
                         f"--max-seq-length sets the limit): {_list_sources(self.long, listed)}")
        if self.lost_targets:
            lines.append(f"{len(self.lost_targets)} truncated examples lost completion tokens or "
                         f"their EOS, so the model sees fewer turn endings (--long-examples drop "
                         f"removes them instead): {_list_sources(self.lost_targets, listed)}")
        if self.dropped:
            lines.append(f"{len(self.dropped)} long examples dropped: {_list_sources(self.dropped, listed)}")
        if self.untrainable:
            lines.append(f"{len(self.untrainable)} examples skipped because they have no "
                         f"training target (after truncation, if any): {_list_sources(self.untrainable, listed)}")
        return lines


@dataclass
class EncodedSplit:
    """The encoded examples kept for training and a summary of what encoding changed."""

    examples: list[EncodedExample]
    summary: SplitSummary


def fit_length(encoded: EncodedExample, max_seq_length: int, policy: str) -> EncodedExample | None:
    """Return the example cut to max_seq_length tokens ("truncate"), or None if too long ("drop")."""
    if len(encoded.tokens) <= max_seq_length:
        return encoded
    if policy == "drop":
        return None
    if policy != "truncate":
        raise ValueError(f"long_examples must be 'truncate' or 'drop', got {policy!r}")
    return EncodedExample(encoded.tokens[:max_seq_length], encoded.mask[:max_seq_length], encoded.source)


def encode_split(examples: list[Example], tokenizer, config) -> EncodedSplit:
    """Encode and fit every example of a split; raise DataError listing every problem.

    Uses config.train_on_prompt, config.max_seq_length and config.long_examples. Examples
    with no target left are skipped, because they would divide the loss by zero.
    """
    if not examples:
        raise DataError("No examples to encode. Add at least one example to the data file.")
    _check_template(examples, tokenizer)

    encoded, problems = [], []
    for example in examples:
        try:
            encoded.append(encode_example(example, tokenizer, config.train_on_prompt))
        except DataError as error:
            problems.extend(error.problems)
    if problems:
        raise DataError(cap_problems(problems), header=f"{len(problems)} examples cannot be encoded:")

    kept, summary = _fit_all(encoded, config)
    if not kept:
        raise DataError(
            f"{_file_of(examples[0].source)}: no example has a training target left "
            f"(max_seq_length {config.max_seq_length}, long_examples {config.long_examples}). "
            f"Raise --max-seq-length, use --long-examples truncate, or check that the "
            f"completions and assistant turns are not empty."
        )
    return EncodedSplit(kept, summary)


def _check_template(examples: list[Example], tokenizer) -> None:
    """Raise once, not once per line, when chat data meets a model without a template."""
    if has_chat_template(tokenizer):
        return
    chats = [example for example in examples if example.kind == "chat"]
    if chats:
        raise DataError(no_template_message(f"{_file_of(chats[0].source)} ({len(chats)} chat examples)"))


def _fit_all(encoded: list[EncodedExample], config) -> tuple[list[EncodedExample], SplitSummary]:
    limit = config.max_seq_length
    longest = max(len(example.tokens) for example in encoded)
    summary = SplitSummary(len(encoded), limit, longest, [], [], [], [])

    kept = []
    for example in encoded:
        fitted = fit_length(example, limit, config.long_examples)
        if len(example.tokens) > limit:
            summary.long.append(example.source)
        if fitted is None:
            summary.dropped.append(example.source)
            continue
        if any(example.mask[limit:]):
            summary.lost_targets.append(example.source)
        if fitted.num_targets == 0:
            summary.untrainable.append(example.source)
            continue
        kept.append(fitted)
    return kept, summary


def _file_of(source: str) -> str:
    return source.rsplit(":", 1)[0]


def _list_sources(sources: list[str], listed: int) -> str:
    text = ", ".join(sources[:listed])
    rest = len(sources) - listed
    return text + (f" and {rest} more" if rest > 0 else "")
