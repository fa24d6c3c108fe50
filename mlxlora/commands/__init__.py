"""Subcommands of the mlxlora CLI; each module defines a click command named ``command``."""
