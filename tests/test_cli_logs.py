"""The command line's logs: library chatter and expected warnings dropped, log lines kept off the progress bars."""

import logging
import sys

import pytest
import tqdm

from trapo_jax import main


@pytest.mark.parametrize("path, level, msg, shown", [
    ("/site-packages/jax/_src/xla_bridge.py", logging.INFO, "Unable to initialize backend 'tpu': ...", False),
    ("/site-packages/tensorflow_datasets/core/dataset_builder.py", logging.INFO, "Reusing dataset", False),
    ("/site-packages/tensorflow_datasets/core/dataset_builder.py", logging.WARNING,
     "Using custom data configuration: DemosConfig(...)", False),
    ("/site-packages/tensorflow_datasets/core/dataset_builder.py", logging.WARNING, "Something else", True),
    ("/site-packages/jax/_src/xla_bridge.py", logging.WARNING, "Platform 'tpu' is experimental", True),
    ("/trapo_jax/data/pipeline.py", logging.INFO, "preparing synthetic/default/1.0.0", True),
])
def test_library_chatter_is_dropped_and_the_rest_kept(path, level, msg, shown):
  record = logging.LogRecord("x", level, path, 1, msg, None, None)
  assert main._QuietLibraries().filter(record) == shown  # pylint: disable=protected-access


def test_a_line_logged_under_an_open_progress_bar_starts_its_own_line(capsys):
  logger = logging.getLogger("test_between_bars")
  logger.propagate = False
  logger.setLevel(logging.INFO)
  logger.addHandler(main._BetweenBars())  # pylint: disable=protected-access
  with tqdm.tqdm(total=2, desc="train", file=sys.stderr) as bar:
    bar.update(1)
    logger.info("checkpoint saved at step 1")
  [line] = [line for line in capsys.readouterr().err.split("\n") if "checkpoint saved" in line]
  # What the terminal shows of that line: the text after its last carriage return, the log line alone.
  assert line.split("\r")[-1].startswith("I") and "train" not in line.split("\r")[-1]
