"""`pip install .` installs every file the package reads at run time: the wheel that pyproject.toml builds holds every
file of the installed packages' source trees (the assets, benchmark files and experiment configs included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trapo_jax", "experiments")  # pyproject.toml's [tool.setuptools.packages.find]


def _tree(root: str, package: str) -> set[str]:
  """The package's files under `root`, as wheel member names (caches left out)."""
  files = set()
  for parent, dirs, names in os.walk(os.path.join(root, package)):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    files.update(os.path.relpath(os.path.join(parent, n), root).replace(os.sep, "/") for n in names
                 if not n.endswith(".pyc"))
  return files


def test_the_wheel_holds_every_file_of_the_packages(tmp_path):
  # Built from a copy: a build in the checkout would leave build/ and *.egg-info behind.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for package in PACKAGES:
    shutil.copytree(os.path.join(ROOT, package), src / package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                         "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [wheel] = os.listdir(tmp_path / "dist")
  with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
    members = {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
  expected = set().union(*(_tree(ROOT, p) for p in PACKAGES))
  assert expected - members == set()  # a file a run reads, left out of the install
  assert members - expected == set()  # nothing but the packages
  # The files the default experiment opens by path (main.DEFAULT_CONFIG, the shipped policy) are among them.
  from trapo_jax import main
  from trapo_jax.data import synthetic
  for path in (main.DEFAULT_CONFIG, os.path.join(synthetic.BASE_POLICY_DIR, "model.safetensors")):
    assert os.path.relpath(path, ROOT).replace(os.sep, "/") in members
