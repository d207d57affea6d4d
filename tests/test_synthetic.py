"""The synthetic task: correct step-by-step solutions, disjoint splits, the tokenizer's "\\n\\n" token, TFDS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import math_verify
import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from tests import helpers
from trapo_jax.data import synthetic
from trapo_jax.data.templates import TEMPLATES, format_prompt
from trapo_jax.models import hf
from trapo_jax.sampling import microgroup

PROBLEM = re.compile(r"Start with (\d+)\. (.*)\. What is the result\?")
OP = re.compile(r"(add|subtract) (\d+)")


def _parse(problem: str) -> tuple[int, list[tuple[str, int]]]:
  """(start, [(op, operand), ...]) read back from the problem text."""
  match = PROBLEM.fullmatch(problem)
  assert match, problem
  words = match.group(2).split(", ")
  ops = [OP.fullmatch(w.lower()).groups() for w in words]
  return int(match.group(1)), [("+" if w == "add" else "-", int(x)) for w, x in ops]


def _identity(problem: str) -> tuple:
  start, ops = _parse(problem)
  return start, tuple(ops)


@pytest.fixture(scope="module")
def examples():
  return synthetic.generate_split("train", 300, seed=3) + synthetic.generate_split("test", 100, seed=3)


def _check_example(ex: dict) -> None:
  start, ops = _parse(ex["problem"])
  assert len(ops) == ex["level"]
  value, values = start, [start]
  for op, x in ops:
    value = value + x if op == "+" else value - x
    assert 0 <= value <= 99, ex["problem"]
    values.append(value)
  assert ex["answer"] == str(value)
  d0, d1 = ex["demos"]
  assert d0 != d1
  steps0, steps1 = d0.split("\n\n"), d1.split("\n\n")
  # Demo #0: one equation per operation; demo #1: the start, then the running total after each operation.
  assert steps0[:-1] == [f"{values[i]} {op} {x} = {values[i + 1]}" for i, (op, x) in enumerate(ops)]
  assert steps1[0] == f"Start: {start}"
  for i, (op, x) in enumerate(ops):
    assert steps1[i + 1] == f"After {'adding' if op == '+' else 'subtracting'} {x}: {values[i + 1]}"
  assert len(steps1) == len(ops) + 2
  for demo in (d0, d1):
    assert demo.endswith(f"\\boxed{{{value}}}.") and demo.count("\\boxed") == 1
    assert all(s and s.strip() == s for s in demo.split("\n\n"))


def test_solutions_are_correct_and_stepwise(examples):
  for ex in examples:
    _check_example(ex)


def test_make_example_every_level():
  rng = np.random.default_rng(0)
  for level in range(1, 9):
    for _ in range(30):
      ex = synthetic.make_example(rng, level)
      assert ex["level"] == level
      _check_example(ex)
  again = synthetic.make_example(np.random.default_rng(5), 4)
  assert again == synthetic.make_example(np.random.default_rng(5), 4)


def test_math_verify_grades_the_demos(examples):
  for ex in examples[::5]:
    gold = math_verify.parse(f"${ex['answer']}$")
    wrong = math_verify.parse(f"${int(ex['answer']) + 1}$")
    for demo in ex["demos"]:
      assert math_verify.verify(gold, math_verify.parse(demo))
      assert not math_verify.verify(wrong, math_verify.parse(demo))


def test_splits_are_disjoint_and_deterministic():
  train = synthetic.generate_split("train", 3000, seed=0)
  test = synthetic.generate_split("test", 600, seed=0)
  other_test = synthetic.generate_split("test", 600, seed=1)
  train_ids = {_identity(e["problem"]) for e in train}
  assert len(train_ids) == len(train) and len({_identity(e["problem"]) for e in test}) == len(test)
  # The split follows the problem, not the seed.
  assert not train_ids & {_identity(e["problem"]) for e in test + other_test}
  assert synthetic.generate_split("test", 600, seed=0) == test
  assert other_test != test
  assert {e["level"] for e in test} == {e["level"] for e in train} == set(synthetic.LEVELS)
  assert {e["level"] for e in synthetic.generate_split("train", 100, levels=(2, 5), seed=0)} == {2, 5}
  assert set(synthetic.HARD_LEVELS) < set(synthetic.LEVELS)


def test_bad_split_arguments_are_named():
  with pytest.raises(ValueError, match="split: 'validation'"):
    synthetic.generate_split("validation", 10)
  with pytest.raises(ValueError, match="levels"):
    synthetic.generate_split("train", 10, levels=(0, 1))
  with pytest.raises(ValueError, match="num: 5000 test problems requested"):
    synthetic.generate_split("test", 5000, levels=(1,))  # about 1.3k distinct level-1 test problems exist


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR, local_files_only=True)


def test_tokenizer_special_tokens(tokenizer):
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(synthetic.TOKENIZER_DIR, local_files_only=True)
  for tok in (tokenizer, fast):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in synthetic.SPECIAL_TOKENS:
      ids = tok.encode(special, add_special_tokens=False)
      assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    assert tok.encode("a", add_special_tokens=True) == tok.encode("a", add_special_tokens=False)  # no BOS
    assert len(tok) <= 512


def test_the_processes_tests_start_read_the_shipped_model_config_without_torch():
  """helpers.cpu_env hides torch from the runs the tests start, as a run installed from requirements.txt has none:
  transformers then reads the base policy's config.json without importing it (about 3 s of CPU a process)."""
  code = ("import sys, importlib.util; from trapo_jax.models import hf; from trapo_jax.data import synthetic; "
          "print(hf.config_from_hf(synthetic.BASE_POLICY_DIR).hidden_size, importlib.util.find_spec('torch'), "
          "sys.modules['torch'])")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, env=helpers.cpu_env(1), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [str(hf.config_from_hf(synthetic.BASE_POLICY_DIR).hidden_size), "None", "None"]


def test_the_run_loads_the_shipped_tokenizer_as_auto_tokenizer_does_without_torch(tokenizer, examples):
  """hf.load_tokenizer takes the generic class the directory names directly (AutoTokenizer's config machinery
  imports torch, seconds of every run's start): the same class, special tokens and encodings, and no torch."""
  code = ("import sys; from trapo_jax.models import hf; from trapo_jax.data import synthetic; "
          "tok = hf.load_tokenizer(synthetic.TOKENIZER_DIR); print(type(tok).__name__, 'torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [type(tokenizer).__name__, "False"]
  ours = hf.load_tokenizer(synthetic.TOKENIZER_DIR)
  assert type(ours) is type(tokenizer)
  assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id, len(ours)) == (
      tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, len(tokenizer))
  for ex in examples[:50]:
    text = format_prompt(ex["problem"], "train") + ex["demos"][0] + "<|im_end|>"
    assert ours.encode(text) == tokenizer.encode(text)


def test_a_tokenizer_of_another_class_still_loads_through_auto_tokenizer(tokenizer, tmp_path):
  config = json.load(open(os.path.join(synthetic.TOKENIZER_DIR, "tokenizer_config.json")))
  for name in os.listdir(synthetic.TOKENIZER_DIR):
    if name != "tokenizer_config.json":
      shutil.copy(os.path.join(synthetic.TOKENIZER_DIR, name), tmp_path / name)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="Qwen2Tokenizer")))
  qwen = hf.load_tokenizer(str(tmp_path))
  assert type(qwen) is transformers.Qwen2Tokenizer
  assert qwen.encode("Start with 12. Add 3.") == tokenizer.encode("Start with 12. Add 3.")


def test_tokenizer_steps_digits_and_round_trip(tokenizer, examples):
  nn = tokenizer.encode("\n\n", add_special_tokens=False)
  assert len(nn) == 1 and "ĊĊ" in tokenizer.convert_ids_to_tokens(nn)[0]
  # The official cut rule's set: every token containing "ĊĊ". It must be exactly the step separator.
  assert microgroup.split_token_ids(tokenizer).tolist() == nn
  for ex in examples:
    texts = [ex["problem"], *ex["demos"], *(format_prompt(ex["problem"], name) for name in TEMPLATES)]
    for text in texts:
      enc = tokenizer.encode(text, add_special_tokens=False)
      assert tokenizer.decode(enc) == text
      pieces = [tokenizer.decode([i]) for i in enc]
      assert "".join(pieces) == text
      assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces
    for demo in ex["demos"]:
      enc = tokenizer.encode(demo, add_special_tokens=False)
      # Every step boundary is the "\n\n" token, so the decoded steps between them are the written steps.
      assert enc.count(nn[0]) == demo.count("\n\n")
      bounds = [-1] + [i for i, t in enumerate(enc) if t == nn[0]] + [len(enc)]
      assert [tokenizer.decode(enc[a + 1:b]) for a, b in zip(bounds, bounds[1:])] == demo.split("\n\n")
  for name in TEMPLATES:
    if "<|im_start|>" in TEMPLATES[name]:  # the chat format whose special tokens this tokenizer has (not llama3's)
      assert len(tokenizer.encode(format_prompt("", name), add_special_tokens=False)) < 40


def test_hard_level_prefixes_end_on_a_step(tokenizer):
  """The 25%/50% prefixes of demo #0 (docs/algorithm.md cut rule, EOS appended) end on "\\n\\n" at the hard levels."""
  cc = microgroup.split_token_ids(tokenizer)
  for ex in synthetic.generate_split("train", 200, levels=synthetic.HARD_LEVELS, seed=4):
    ids = tokenizer.encode(ex["demos"][0], add_special_tokens=False) + [tokenizer.eos_token_id]
    for ratio in (0.25, 0.5):
      cut = microgroup.prefix_cut(ids, ratio, cc)
      assert ids[cut - 1] == cc[0] and cut < len(ids)


def test_tokenizer_regenerates_identically(tmp_path):
  synthetic.build_tokenizer(str(tmp_path))
  with open(os.path.join(tmp_path, "tokenizer.json")) as a, \
       open(os.path.join(synthetic.TOKENIZER_DIR, "tokenizer.json")) as b:
    assert a.read() == b.read()
  with open(os.path.join(tmp_path, "tokenizer_config.json")) as a, \
       open(os.path.join(synthetic.TOKENIZER_DIR, "tokenizer_config.json")) as b:
    assert json.load(a) == json.load(b)


def test_lengths_fit_the_default_config(tokenizer):
  from experiments.configs import default
  cfg = default.get_config()
  hardest = [e for e in synthetic.generate_split("test", 600, seed=0) if e["level"] == max(synthetic.LEVELS)]
  prompt = max(len(tokenizer.encode(format_prompt(e["problem"], cfg.data.template))) for e in hardest)
  demo = max(len(tokenizer.encode(d)) + 1 for e in hardest for d in e["demos"])
  assert prompt <= cfg.data.max_prompt_len and demo <= cfg.data.max_response_len
  assert demo <= cfg.eval.max_new_tokens
  assert synthetic.max_lengths(tokenizer, hardest)[max(synthetic.LEVELS)] == (prompt, demo)


def test_tfds_builder(tmp_path):
  config = synthetic.SyntheticConfig(name="small", num_train=40, num_test=12, train_levels=(1, 2),
                                     test_levels=(5, 6), seed=2)
  builder = synthetic.Synthetic(data_dir=str(tmp_path), config=config)
  builder.download_and_prepare()
  features = builder.info.features
  assert features["uid"].np_dtype == np.int64 and features["level"].np_dtype == np.int32
  assert isinstance(features["demos"], tfds.features.Sequence)
  for split, num, levels in (("train", 40, (1, 2)), ("test", 12, (5, 6))):
    source = builder.as_data_source(split)
    assert len(source) == num
    rows = sorted((source[i] for i in range(num)), key=lambda r: int(r["uid"]))
    expected = synthetic.generate_split(split, num, levels, seed=2)
    for uid, (row, ex) in enumerate(zip(rows, expected)):
      assert set(row) == {"uid", "problem", "answer", "demos", "level"}
      assert int(row["uid"]) == uid and int(row["level"]) == ex["level"]
      assert row["problem"].decode() == ex["problem"] and row["answer"].decode() == ex["answer"]
      assert [d.decode() for d in row["demos"]] == list(ex["demos"])
    assert {int(r["level"]) for r in rows} == set(levels)
