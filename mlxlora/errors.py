"""Errors that reach the user as a message, never as a traceback.

Each error carries every problem found, so a user fixes a file once instead of once per
line. The CLI prints ``str(error)`` and exits with status 2.
"""


class MlxloraError(Exception):
    """A problem with the user's input or environment that the user can fix."""

    def __init__(self, problems: list[str] | str, header: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1 and not self.header:
            return self.problems[0]
        header = self.header or f"{len(self.problems)} problems found:"
        return "\n".join([header] + [f"  - {p}" for p in self.problems])


class ConfigError(MlxloraError):
    """An invalid option, recipe key or value."""


class DataError(MlxloraError):
    """Invalid or unusable training data; problems name file:line."""


class ModelError(MlxloraError):
    """A model that cannot be found, read or adapted."""


class AdapterError(MlxloraError):
    """An adapter folder that is missing, invalid or made for another base model."""
