"""The import graph goes downward only: models, sharding, losses, sampler -> schedule, rollout(s), algorithms -> train
and eval (siblings, never importing each other) -> main and aot (the compile mode). Imports inside functions count
too."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trapo_jax")

# Lower numbers are lower layers; a module may import its own layer and below.
LAYERS = [
    ("trapo_jax.errors", "trapo_jax.shapes", "trapo_jax.paths", "trapo_jax.reduction"),
    ("trapo_jax.models", "trapo_jax.sharding", "trapo_jax.losses", "trapo_jax.sampling", "trapo_jax.rewards",
     "trapo_jax.data", "trapo_jax.distributed"),
    ("trapo_jax.sampling.microgroup", "trapo_jax.sampling.rollout", "trapo_jax.sampling.rollouts",
     "trapo_jax.algorithms"),
    ("trapo_jax.config",),
    ("trapo_jax.train", "trapo_jax.eval"),
    ("trapo_jax.main", "trapo_jax.aot"),
]
SIBLINGS = (("trapo_jax.train", "trapo_jax.eval"),)


def _layer(module: str) -> tuple[int, str]:
  """(layer, prefix) of the longest prefix naming `module` (trapo_jax.sampling.rollout sits above the sampler)."""
  found = [(len(p), i, p) for i, prefixes in enumerate(LAYERS) for p in prefixes
           if module == p or module.startswith(p + ".")]
  assert found, f"{module}: in no layer of tests/test_layers.py (add it)"
  _, i, p = max(found)
  return i, p


def _modules():
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _imports(path: str, module: str):
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative
        base = ".".join(module.split(".")[:-node.level] + [node.module])
      yield from (f"{base}.{a.name}" for a in node.names)


def test_imports_go_downward_only():
  bad = []
  for module, path in _modules():
    if module == "trapo_jax":
      continue
    mine, my_prefix = _layer(module)
    for imported in _imports(path, module):
      if not imported.startswith("trapo_jax.") or imported == "trapo_jax":
        continue
      theirs, their_prefix = _layer(imported)
      if theirs > mine:
        bad.append(f"{module} imports {imported} (layer {theirs} above {mine})")
      if {my_prefix, their_prefix} in [set(s) for s in SIBLINGS]:
        bad.append(f"{module} imports its sibling {imported}")
  assert not bad, "\n".join(bad)
