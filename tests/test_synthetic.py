"""The synthetic task: correct step-by-step solutions, disjoint splits, the tokenizer's "\\n\\n" token, TFDS."""

from __future__ import annotations

import os
import re

import math_verify
import numpy as np
import pytest
import transformers

from trapo_jax.data import synthetic
from trapo_jax.data.templates import TEMPLATES, format_prompt
from trapo_jax.sampling import microgroup

OPS = re.compile(r"(add|subtract) (\d+)")


def _parse(problem: str) -> tuple[int, list[tuple[str, int]]]:
  start = int(re.match(r"Start with (\d+)\.", problem).group(1))
  return start, [("+" if w.lower() == "add" else "-", int(x)) for w, x in OPS.findall(problem.lower())]


@pytest.fixture(scope="module")
def examples():
  return synthetic.generate_split("train", 300, seed=3)


def test_solutions_are_correct_and_stepwise(examples):
  for ex in examples:
    start, ops = _parse(ex["problem"])
    assert len(ops) == ex["level"]
    value, values = start, [start]
    for op, x in ops:
      value = value + x if op == "+" else value - x
      assert 0 <= value <= 99
      values.append(value)
    assert ex["answer"] == str(value)
    d0, d1 = ex["demos"]
    assert d0 != d1
    for demo in (d0, d1):
      steps = demo.split("\n\n")
      assert len(steps) == ex["level"] + 1 + (demo is d1)  # one per operation (+ "Start:"), then the answer
      assert steps[-1].endswith(f"\\boxed{{{value}}}.")
    for i, (op, x) in enumerate(ops):  # demo #0 writes each equation, demo #1 each running total
      assert d0.split("\n\n")[i] == f"{values[i]} {op} {x} = {values[i + 1]}"
      assert d1.split("\n\n")[i + 1].endswith(f": {values[i + 1]}")


def test_math_verify_grades_the_demos(examples):
  for ex in examples[:40]:
    gold = math_verify.parse(f"${ex['answer']}$")
    for demo in ex["demos"]:
      assert math_verify.verify(gold, math_verify.parse(demo))
      assert not math_verify.verify(math_verify.parse(f"${int(ex['answer']) + 1}$"), math_verify.parse(demo))


def test_splits_are_disjoint_and_deterministic():
  train = synthetic.generate_split("train", 2000, seed=0)
  test = synthetic.generate_split("test", 300, seed=0)
  assert not {e["problem"] for e in train} & {e["problem"] for e in test}
  assert synthetic.generate_split("test", 300, seed=0) == test
  assert synthetic.generate_split("test", 300, seed=1) != test
  assert {e["level"] for e in test} == set(synthetic.LEVELS)
  assert set(synthetic.EASY_LEVELS) | set(synthetic.HARD_LEVELS) == set(synthetic.LEVELS)


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR, local_files_only=True)


def test_tokenizer(tokenizer, examples):
  ids = tokenizer.encode("\n\n", add_special_tokens=False)
  assert len(ids) == 1 and "ĊĊ" in tokenizer.convert_ids_to_tokens(ids)[0]
  assert microgroup.split_token_ids(tokenizer).tolist() == ids
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
  for ex in examples[:50]:
    for text in (ex["problem"], *ex["demos"], format_prompt(ex["problem"], "train")):
      enc = tokenizer.encode(text, add_special_tokens=False)
      assert tokenizer.decode(enc) == text
      # Digits are single tokens, and every step boundary is the "\n\n" token.
      assert all(len(t) == 1 for t in tokenizer.convert_ids_to_tokens(enc) if any(c.isdigit() for c in t))
    demo_ids = tokenizer.encode(ex["demos"][0], add_special_tokens=False)
    assert demo_ids.count(ids[0]) == ex["demos"][0].count("\n\n")
  for name in TEMPLATES:
    assert len(tokenizer.encode(format_prompt("", name), add_special_tokens=False)) < 40


def test_tokenizer_regenerates_identically(tmp_path):
  synthetic.build_tokenizer(str(tmp_path))
  with open(os.path.join(tmp_path, "tokenizer.json")) as a, \
       open(os.path.join(synthetic.TOKENIZER_DIR, "tokenizer.json")) as b:
    assert a.read() == b.read()


def test_lengths_fit_the_default_config(tokenizer):
  from experiments.configs import default
  cfg = default.get_config()
  hardest = [e for e in synthetic.generate_split("test", 300, seed=0) if e["level"] == max(synthetic.LEVELS)]
  prompt = max(len(tokenizer.encode(format_prompt(e["problem"], cfg.data.template))) for e in hardest)
  demo = max(len(tokenizer.encode(d)) + 1 for e in hardest for d in e["demos"])
  assert prompt <= cfg.data.max_prompt_len and demo <= cfg.data.max_response_len


def test_tfds_builder(tmp_path):
  builder = synthetic.Synthetic(data_dir=str(tmp_path), config=synthetic.SyntheticConfig(
      name="small", num_train=40, num_test=10))
  builder.download_and_prepare()
  train = builder.as_data_source("train")
  assert len(train) == 40 and len(builder.as_data_source("test")) == 10
  row = train[0]
  assert set(row) == {"uid", "problem", "answer", "demos", "level"}
  assert len(row["demos"]) == 2 and 1 <= int(row["level"]) <= 6
  assert sorted(int(train[i]["uid"]) for i in range(40)) == list(range(40))
  assert np.all([train[i]["answer"] for i in range(40)])
