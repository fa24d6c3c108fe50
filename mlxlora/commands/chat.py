"""`mlxlora chat`: talk to a model and its adapter in the terminal or through a pipe.

The options shared with `generate` and `eval` are defined here too.
"""

import logging
import sys
from collections.abc import Callable

import click

from mlxlora.errors import ConfigError

logger = logging.getLogger("mlxlora")

COMMANDS = {"/reset": "clear the history", "/quit": "exit", "/help": "list the commands"}


def model_options(function):
    """Add --model and --adapter-path."""
    function = click.option(
        "--adapter-path", type=click.Path(file_okay=False), default=None,
        help="Adapter folder from `mlxlora train` (the base model is taken from its "
             "adapter_config.json unless --model is given).")(function)
    return click.option(
        "--model", default=None,
        help="Base model (Hub id, folder, .gguf file or PACKAGE/FILE.gguf) or a fused model. "
             "Default: the adapter's base model, else the default training model.")(function)


def sampling_options(function):
    """Add --temp, --top-p, --max-tokens and --seed with mlx-lm's defaults."""
    function = click.option("--seed", type=int, default=0, show_default=True,
                            help="Random seed, set again before every answer so that "
                                 "answers are reproducible.")(function)
    function = click.option("--max-tokens", type=int, default=256, show_default=True,
                            help="Maximum tokens per answer.")(function)
    function = click.option("--top-p", type=float, default=1.0, show_default=True,
                            help="Nucleus sampling: sample from the smallest set of tokens "
                                 "whose probability reaches this; 1.0 turns it off.")(function)
    return click.option("--temp", type=float, default=0.0, show_default=True,
                        help="Sampling temperature; 0 is greedy decoding.")(function)


def sampling_settings(temp: float, top_p: float, max_tokens: int, seed: int):
    """Return GenerationSettings; raise ConfigError listing every invalid value."""
    from mlxlora.inference import GenerationSettings

    problems = []
    if temp < 0:
        problems.append(f"--temp {temp}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}: must be more than 0 and at most 1 (1 turns it off)")
    if max_tokens < 1:
        problems.append(f"--max-tokens {max_tokens}: must be at least 1")
    if problems:
        raise ConfigError(problems)
    return GenerationSettings(temp=temp, top_p=top_p, max_tokens=max_tokens, seed=seed)


def check_compare(loaded, compare: bool) -> None:
    if compare and not loaded.has_adapter:
        raise ConfigError("--compare shows the base model's and the adapter's answers side by "
                          "side, so it needs an adapter: pass --adapter-path.")


@click.command("chat")
@model_options
@click.option("--system-prompt", default=None, help="System message that starts the conversation.")
@sampling_options
@click.option("--compare", is_flag=True,
              help="Answer every message with the base model and with the adapter, side by side.")
def command(model, adapter_path, system_prompt, temp, top_p, max_tokens, seed, compare) -> None:
    """Chat with a model and its adapter, using the chat template that training used.

    On a terminal, answers stream as they are generated; /reset clears the history and /quit
    (or Ctrl-D) exits. With piped input, each input line gets one answer line (line breaks
    inside an answer are written as \\n) and commands print nothing.
    """
    from mlxlora.inference import load_for_inference

    settings = sampling_settings(temp, top_p, max_tokens, seed)
    loaded = load_for_inference(model, adapter_path)
    check_compare(loaded, compare)

    session = ChatSession(loaded, settings, system_prompt, compare)
    if sys.stdin.isatty():
        session.run_terminal()
    else:
        session.run_piped(sys.stdin)


class Conversation:
    """The messages that one model has seen: the system prompt and the finished turns."""

    def __init__(self, system_prompt: str | None, keeps_history: bool):
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.turns: list[dict] = []
        self.keeps_history = keeps_history

    def prompt(self, text: str, fits: Callable[[list[dict]], bool] | None = None) -> list[dict]:
        """Return the messages that answer ``text``, without the oldest turns that do not fit.

        While ``fits`` rejects the messages, the oldest user and assistant pair is dropped
        from the history for good. The system prompt and the new message are always sent.
        """
        message = [{"role": "user", "content": text}]
        dropped = 0
        while fits is not None and dropped < len(self.turns) // 2:
            if fits(self.system + self.turns[2 * dropped:] + message):
                break
            dropped += 1

        if dropped:
            self.turns = self.turns[2 * dropped:]
            logger.info("history: dropped the %d oldest turn(s) to fit the model's context",
                        dropped)
        messages = self.system + self.turns + message
        if fits is not None and not self.turns and not fits(messages):
            logger.warning("this message and an answer of --max-tokens tokens exceed the "
                           "model's context length. Shorten the message or lower --max-tokens.")
        return messages

    def record(self, text: str, answer: str) -> None:
        if self.keeps_history:
            self.turns += [{"role": "user", "content": text},
                           {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns = []


class ChatSession:
    """A chat with one model, or with the base and the adapter side by side (compare).

    In compare mode each side keeps its own history, so each model continues the
    conversation from its own earlier answers.
    """

    def __init__(self, loaded, settings, system_prompt: str | None = None, compare: bool = False):
        from mlxlora.prompt import has_chat_template

        keeps_history = has_chat_template(loaded.tokenizer)
        if not keeps_history:
            if system_prompt:
                raise ConfigError("--system-prompt: this model has no chat template, so it "
                                  "cannot take a system message. Leave the option out.")
            logger.warning("this model has no chat template: each message is continued as "
                           "plain text, and no history is kept")

        self.loaded = loaded
        self.settings = settings
        self.context_length = loaded.config.get("max_position_embeddings")
        names = ("base", "adapter") if compare else ("model",)
        self.sides = {name: Conversation(system_prompt, keeps_history) for name in names}

    @property
    def compare(self) -> bool:
        return "base" in self.sides

    def run_command(self, line: str) -> str | None:
        """Apply a /command line; return "quit", "handled", or None for a message.

        A single word that starts with "/" and is no command is rejected instead of being
        sent, because it is most likely a mistyped command.
        """
        word = line.strip()
        if not word.startswith("/") or " " in word:
            return None
        if word == "/quit":
            return "quit"
        if word == "/reset":
            for conversation in self.sides.values():
                conversation.reset()
            logger.info("history cleared")
        elif word == "/help":
            logger.info("commands: %s", describe_commands())
        else:
            logger.warning("unknown command %s; commands: %s", word, describe_commands())
        return "handled"

    def answer(self, name: str, text: str):
        """Generate side ``name``'s whole answer to ``text`` and add the turn to its history."""
        from mlxlora.inference import adapters_disabled, generate_answer

        conversation = self.sides[name]
        prompt = conversation.prompt(text, self.fits_context if self.context_length else None)
        if name == "base":
            with adapters_disabled(self.loaded.model):
                answer = generate_answer(self.loaded, prompt, self.settings)
        else:
            answer = generate_answer(self.loaded, prompt, self.settings)
        conversation.record(text, answer.text)
        return answer

    def fits_context(self, messages: list[dict]) -> bool:
        """Return whether the messages and a full answer fit the model's context length."""
        from mlxlora.inference import prompt_tokens

        needed = len(prompt_tokens(self.loaded.tokenizer, messages)) + self.settings.max_tokens
        return needed <= self.context_length

    def run_piped(self, lines) -> None:
        """Answer each message line with one output line per side."""
        for line in lines:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            action = self.run_command(line)
            if action == "quit":
                return
            if action:
                continue

            for name in self.sides:
                text = one_line(self.answer(name, line).text)
                click.echo(f"{name}: {text}" if self.compare else text)

    def run_terminal(self) -> None:
        """Read messages with line editing, stream answers, or show both sides in compare mode."""
        from rich.console import Console

        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass

        console = Console()
        model = self.loaded.model_id
        if self.loaded.has_adapter:
            model += f" and adapter {self.loaded.adapter_path}"
        if self.compare:
            model += " (base and adapter answers side by side)"
        console.print(f"Chat with {model}. Commands: {describe_commands()}; Ctrl-D exits.",
                      markup=False, highlight=False)
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            action = self.run_command(line)
            if action == "quit":
                return
            if action or not line.strip():
                continue

            if self.compare:
                self.show_side_by_side(console, line)
            else:
                self.stream_reply(line)

    def stream_reply(self, text: str) -> None:
        """Print the answer as it is generated; Ctrl-C stops it and keeps it out of the history."""
        from mlxlora.inference import stream_answer

        conversation = self.sides["model"]
        pieces = []
        try:
            for piece in stream_answer(self.loaded, conversation.prompt(text), self.settings):
                click.echo(piece, nl=False)
                sys.stdout.flush()
                pieces.append(piece)
        except KeyboardInterrupt:
            click.echo("\n[answer stopped; it is not kept in the history]")
            return
        click.echo()
        conversation.record(text, "".join(pieces))

    def show_side_by_side(self, console, text: str) -> None:
        from rich.table import Table
        from rich.text import Text

        answers = {}
        for name in self.sides:
            with console.status(f"{name} is answering..."):
                answers[name] = self.answer(name, text).text

        table = Table(expand=True, show_lines=True)
        for name in answers:
            table.add_column(name, ratio=1)
        # Text objects keep brackets in answers from being read as rich markup.
        table.add_row(*(Text(answer) for answer in answers.values()))
        console.print(table)


def one_line(text: str) -> str:
    """Write an answer on one line: backslashes become \\\\ and line breaks \\n."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def describe_commands() -> str:
    return ", ".join(f"{name} ({meaning})" for name, meaning in COMMANDS.items())
