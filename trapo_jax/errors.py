"""Errors every layer may raise about the run's configuration; the bottom of the import graph."""

from __future__ import annotations


class ConfigError(ValueError):
  """A config key has a value that cannot work; the message starts with the key."""


def require(cond: bool, key: str, msg: str) -> None:
  """Raises ConfigError("<key>: <msg>") unless `cond`."""
  if not cond:
    raise ConfigError(f"{key}: {msg}")
