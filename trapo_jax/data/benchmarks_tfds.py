"""The evaluation benchmarks as a TFDS builder: one config per benchmark, one split, "test".

Generated from the vendored files read by `trapo_jax.data.benchmark_files.load_benchmark`. Prepared data is keyed by
benchmark name and `Benchmarks.VERSION`: bump the version when a vendored file changes.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from trapo_jax.data import benchmark_files
from trapo_jax.data.demos import ArrayRecordBuilder

SPLIT = "test"


class Benchmarks(ArrayRecordBuilder):
  """Math benchmark problems with reference answers; `uid` is the row index in the benchmark file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The six math benchmarks of the official evaluation, deduplicated."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"{name} ({file})")
                     for name, file in benchmark_files.BENCHMARKS.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "uid": tfds.features.Scalar(dtype=np.int64),
        "id": tfds.features.Text(),
        "source": tfds.features.Text(),
        "problem": tfds.features.Text(),
        "answer": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # the files ship with the package
    return {SPLIT: self._generate_examples(self.builder_config.name)}

  def _generate_examples(self, name: str):
    for uid, row in enumerate(benchmark_files.load_benchmark(name)):
      yield uid, dict(uid=uid, id=row["id"], source=row["source"], problem=row["problem"], answer=row["answer"])


def benchmarks_builder(name: str, *, data_dir: str) -> Benchmarks:
  if name not in benchmark_files.BENCHMARKS:
    raise ValueError(f"benchmark {name!r} is unknown (known: {', '.join(benchmark_files.BENCHMARKS)})")
  return Benchmarks(config=name, data_dir=data_dir)
