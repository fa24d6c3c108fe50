"""Click options generated from the TrainConfig fields, so each option is documented once."""

import dataclasses
import typing

import click

from mlxlora.config import FIELDS, RESUME_FROM_ADAPTER_PATH, flag_name


def _click_type(spec):
    choices = spec.metadata.get("choices")
    if choices:
        return click.Choice(choices)
    args = [a for a in typing.get_args(spec.type) if a is not type(None)] or [spec.type]
    base = typing.get_origin(args[0]) or args[0]
    if base is list:
        return str
    return {int: int, float: float, str: str}.get(base, str)


def _is_bool(spec) -> bool:
    args = typing.get_args(spec.type) or (spec.type,)
    return bool in args


def config_options(names: list[str] | None = None):
    """Return a decorator adding one option per config field (all fields by default).

    Every option defaults to None, meaning "not given", so the config resolver can tell a flag
    from a default and log where each value came from.
    """
    selected = names or list(FIELDS)

    def decorate(function):
        for name in reversed(selected):
            spec = FIELDS[name]
            flag = flag_name(name)
            help_text = spec.metadata["help"]
            default = field_default(spec)
            if default not in (None, []):
                help_text += f"  [default: {default}]"
            if name == "resume":
                function = click.option(flag, name, type=str, default=None, is_flag=False,
                                        flag_value=RESUME_FROM_ADAPTER_PATH,
                                        help=help_text)(function)
            elif _is_bool(spec):
                decl = f"{flag}/--no-{flag[2:]}"
                function = click.option(decl, name, default=None, help=help_text)(function)
            else:
                function = click.option(flag, name, type=_click_type(spec), default=None,
                                        help=help_text)(function)
        return function

    return decorate


def field_default(spec):
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default
