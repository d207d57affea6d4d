"""Training methods, one module each, found by name (docs/algorithm.md; adding one: the README).

Every module of this package is imported here, which registers the methods it defines: adding a method is adding a
file.
"""

import importlib
import pkgutil

from trapo_jax.algorithms.base import Method, Phase, from_config, get, names, register

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base":
    importlib.import_module(f"{__name__}.{_module.name}")
