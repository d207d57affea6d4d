"""Templates, demonstration parsing, the TFDS builders and the prompt loader."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trapo_jax.data import demos, pipeline
from trapo_jax.data.templates import TEMPLATES, chat_template, format_prompt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------- templates

def test_templates_byte_exact():
  assert format_prompt("P", "train") == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nP\n"
      "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  assert format_prompt("P", "eval") == (
      "<|im_start|>user\nP\n"
      "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  # eval_scripts/generate_vllm.py:simplerl_template, a plain (not f-) string: the braces stay doubled.
  official = ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n' + "P"
              + '\nPlease reason step by step, and put your final answer within\\boxed{{}}.<|im_end|>\n'
              '<|im_start|>assistant\n')
  assert format_prompt("P", "eval_official") == official
  assert "within\\boxed{{}}." in format_prompt("P", "eval_official")


def test_model_family_templates_byte_exact():
  user = "<|im_start|>user\nP\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
  # Qwen3's chat template with add_generation_prompt writes "<|im_start|>assistant\n", and with
  # enable_thinking=False also "<think>\n\n</think>\n\n"; our thinking template opens the block itself.
  assert format_prompt("P", "qwen3") == user + "<|im_start|>assistant\n<think>\n"
  assert format_prompt("P", "qwen3_no_think") == user + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  assert format_prompt("P", "llama3") == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nP\n"
      "Please reason step by step, and put your final answer within \\boxed{}.<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_config_schema_knows_every_template():
  from trapo_jax import config as config_lib
  assert config_lib.TEMPLATES == tuple(TEMPLATES)


def test_templates_keep_braces_of_problem():
  problem = "Find {x} in $\\{1, 2\\}$ and {problem} literally."
  for name in TEMPLATES:
    text = format_prompt(problem, name)
    assert text.count(problem) == 1 and "{problem}" not in text.replace(problem, "")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_writes_the_prompt_template(name):
  import jinja2
  problem = "Let {x} = {{ y }}; find \\boxed{} {% raw %}."
  messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": problem}]
  chat = jinja2.Environment().from_string(chat_template(name)).render(messages=messages)
  assert chat == format_prompt(problem, name)


def test_unknown_template():
  with pytest.raises(ValueError, match="'chat'"):
    format_prompt("P", "chat")


# ------------------------------------------------------------------------------------------- thought extraction

@pytest.mark.parametrize("solution,thought", [
    ("<think>\nabc\n\ndef\n</think>\n\nanswer \\boxed{1}", "abc\n\ndef"),
    ("  no tags at all \n", "no tags at all"),
    ("<think>first</think> middle <think>second</think>", "first"),
    ("<think>\nunclosed thought", "unclosed thought"),
    ("thought without opening tag</think> tail", "thought without opening tag"),
    ("<think>  </think>tail", ""),
    ("<think>a\n<b>\nc</think>", "a\n<b>\nc"),
])
def test_extract_thought(solution, thought):
  assert demos.extract_thought(solution) == thought


def test_demo_forms():
  r1 = "<think>\nFirst 2 + 2.\n</think>\n\nSo \\boxed{4}."
  assert demos.demo_text(r1, "thought") == "First 2 + 2."
  assert demos.demo_text(r1, "response") == r1  # LUFFY's target: thought and solution
  assert demos.demo_text(r1, "response_after_think") == "First 2 + 2.\n</think>\n\nSo \\boxed{4}."  # SFT's
  with pytest.raises(ValueError, match="'summary' is unknown"):
    demos.demo_text(r1, "summary")


# ----------------------------------------------------------------------------------------------- demonstration data

def _cfg(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(source="demos", path=str(path)))


def _skip_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]


def _load(path, data_dir, caplog):
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    examples = pipeline.load_examples(_cfg(path), "train", data_dir=str(data_dir))
  return examples, _skip_warnings(caplog)


# Expected content of the fixture's good rows, by row of trapo_layout.jsonl: (source_id, problem, answer, demos).
TRAPO_GOOD = {
    0: ("u-0", "What is $2+2$?", "4", ("Two plus two.\n\nIt is 4.", "Count: 1, 2, 3, 4.")),
    1: ("u-1", "Compute $3 \\times 5$.", "15", ("Three fives make 15.", "5+5+5 = 15")),
    3: ("", "Find $x$ if $x - 1 = 6$.", "7", ("Add one.", "x = 6 + 1", "Seven.")),
    5: ("u-5", "What is $9-3$?", "6", ("Nine minus three is six", "Six, since 3 + 6 = 9.")),
    8: ("u-8", "What is $100-1$?", "99", ("One less than a hundred.", "99")),
    10: ("u-10", "Simplify $\\frac{6}{8}$ in {lowest terms}.", "\\frac{3}{4}", ("Divide by 2.", "gcd is 2, so 3/4.")),
}
OPENR1_GOOD = {
    0: ("r-0", "What is $6 \\cdot 7$?", "42", ("Six sevens.", "7*6=42")),
    1: ("r-1", "What is $12/4$?", "3", ("Twelve over four.", "3 fours are 12.")),
    4: ("", "What is $2 \\cdot 9$?", "18", ("Nine twice.", "18")),
}
# The parquet copy of the TRAPO fixture lacks jsonl rows 7 and 9, so later rows move up.
TRAPO_PARQUET_ROW = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7, 10: 8, 11: 9}

CASES = {
    "trapo_layout.jsonl": (TRAPO_GOOD, {r: r for r in TRAPO_GOOD}, 12,
                           {"missing answer": [2], "fewer than 2 solutions": [4, 11], "empty solution": [6],
                            "wrong type": [7], "unparsable": [9]}),
    "trapo_layout.parquet": (TRAPO_GOOD, TRAPO_PARQUET_ROW, 10,
                             {"missing answer": [2], "fewer than 2 solutions": [4, 9], "empty solution": [6]}),
    "openr1_layout.jsonl": (OPENR1_GOOD, {r: r for r in OPENR1_GOOD}, 5,
                            {"fewer than 2 solutions": [2], "missing answer": [3]}),
    "openr1_layout.parquet": (OPENR1_GOOD, {r: r for r in OPENR1_GOOD}, 5,
                              {"fewer than 2 solutions": [2], "missing answer": [3]}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_rows(name, tmp_path, caplog):
  good, row_of, total, bad = CASES[name]
  path = os.path.join(FIXTURES, name)
  examples, warnings = _load(path, tmp_path, caplog)
  assert [e.uid for e in examples] == sorted(row_of[r] for r in good)
  for e in examples:
    source_row = next(r for r in good if row_of[r] == e.uid)
    _, problem, answer, thoughts = good[source_row]
    # The whole solutions are kept; the thought is what TRAPO's rows take of them.
    assert (e.problem, e.answer, tuple(demos.demo_text(d, "thought") for d in e.demos)) == (problem, answer, thoughts)
  assert len(warnings) == 1
  n_bad = sum(len(ids) for ids in bad.values())
  assert warnings[0].startswith(f"skipped {n_bad} of {total} rows of {os.path.realpath(path)}: ")
  for reason, ids in bad.items():
    assert f"{reason}: {ids}" in warnings[0]
  # Prepared once: a second load reads the prepared data and warns no more.
  again, warnings = _load(path, tmp_path, caplog)
  assert again == examples and not warnings


def test_fixture_source_ids(tmp_path):
  builder = demos.demos_builder(os.path.join(FIXTURES, "trapo_layout.jsonl"), data_dir=str(tmp_path))
  builder.download_and_prepare()
  records = builder.as_data_source("train")
  got = {int(r["uid"]): r["source_id"].decode() for r in records}
  assert got == {r: v[0] for r, v in TRAPO_GOOD.items()}


def test_directory_numbers_rows_across_files(tmp_path, caplog):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("trapo_layout.jsonl", "openr1_layout.parquet"):
    shutil.copy(os.path.join(FIXTURES, name), src / name)
  (src / "notes.txt").write_text("ignored")
  examples, warnings = _load(src, tmp_path / "tfds", caplog)
  # Name order: openr1_layout.parquet (rows 0-4), then trapo_layout.jsonl (rows 5-16).
  assert [e.uid for e in examples] == sorted(OPENR1_GOOD) + [5 + r for r in sorted(TRAPO_GOOD)]
  assert [e.problem for e in examples] == ([v[1] for _, v in sorted(OPENR1_GOOD.items())]
                                           + [v[1] for _, v in sorted(TRAPO_GOOD.items())])
  assert len(warnings) == 1 and "openr1_layout.parquet 0-4, trapo_layout.jsonl 5-16" in warnings[0]
  assert "fewer than 2 solutions: [2, 9, 16]" in warnings[0]


def test_preparing_says_so_in_one_log_line_and_prints_nothing(tmp_path, capfd, caplog):
  path = os.path.join(FIXTURES, "openr1_layout.jsonl")
  caplog.set_level(logging.INFO)
  pipeline.load_examples(_cfg(path), "train", data_dir=str(tmp_path))
  pipeline.load_examples(_cfg(path), "train", data_dir=str(tmp_path))
  out, err = capfd.readouterr()
  assert "Download" not in out + err and "Generating" not in out + err  # TFDS's banner and progress bars
  assert len([r for r in caplog.records if r.getMessage().startswith("preparing ")]) == 1  # once, then reused


def test_changed_source_is_prepared_again(tmp_path, caplog):
  path = tmp_path / "data.jsonl"
  lines = open(os.path.join(FIXTURES, "openr1_layout.jsonl")).read().splitlines()
  path.write_text("\n".join(lines) + "\n")
  first, _ = _load(path, tmp_path / "tfds", caplog)
  path.write_text(lines[1] + "\n")
  second, _ = _load(path, tmp_path / "tfds", caplog)
  assert [e.answer for e in first] == ["42", "3", "18"]
  assert [e.answer for e in second] == ["3"] and second[0].uid == 0


def test_missing_source(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
    pipeline.load_examples(_cfg(tmp_path / "nowhere.parquet"), "train", data_dir=str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty"):
    pipeline.load_examples(_cfg(tmp_path / "empty"), "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("rows,field", [
    ([{"question": "q", "solution": "s"}], "'prompt'"),
    ([{"prompt": "q", "extra_info": {"answer_list": ["a", "b"]}}], "'reward_model.ground_truth'"),
    ([{"problem": "q", "answer": "1", "solutions": ["a", "b"]}], "'generations'"),
])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_wrong_layout_names_path_and_field(rows, field, fmt, tmp_path):
  path = tmp_path / f"bad.{fmt}"
  if fmt == "jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  else:
    pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(demos.LayoutError) as err:
    pipeline.load_examples(_cfg(path), "train", data_dir=str(tmp_path / "tfds"))
  assert str(path) in str(err.value) and field in str(err.value)


def test_fixtures_regenerate_identically(tmp_path):
  spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURES, "make_fixtures.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(str(tmp_path))
  for name in sorted(CASES):
    ours, committed = tmp_path / name, os.path.join(FIXTURES, name)
    if name.endswith(".jsonl"):
      assert ours.read_bytes() == open(committed, "rb").read(), name
    else:  # bytes also carry the writer's version; the content is what must not drift
      assert pq.read_table(ours).equals(pq.read_table(committed)), name


# ----------------------------------------------------------------------------------------------------- the loader

@pytest.fixture(scope="module")
def tokenizer():
  """A byte-level BPE over a few sentences with the chat special tokens: eos <|im_end|>, pad <|endoftext|>."""
  tok = _bpe()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                              additional_special_tokens=["<|im_start|>"])


def _bpe() -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([format_prompt("What is two plus two?", "train"), "The answer is four.\n\nSo it is 4.",
                           "Let me think step by step about the problem."], trainer)
  return tok


def _examples(n: int, seed: int = 0) -> list[pipeline.Example]:
  """n examples with prompts and demos of varied lengths; uids not in row order, as after skipped rows."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    problem = "What is " + " plus ".join(str(x) for x in rng.integers(0, 99, rng.integers(1, 12))) + "?"
    thought0 = "Let me think. " * int(rng.integers(1, 30))
    thought1 = "So it is 4.\n\n" * int(rng.integers(1, 30))
    out.append(pipeline.Example(uid=3 * i + 1, problem=problem, answer=str(i), demos=(thought0, thought1, "extra")))
  return out


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pow2_bucket(length: int, cap: int) -> int:
  widths = [16 * 2 ** k for k in range(20)]
  return min(next(w for w in widths if w >= length), cap)


def _check_batch(batch, tokenizer, examples_by_uid, *, template, max_prompt_len, max_response_len, pad_id, eos_id):
  g = len(batch.uids)
  prompts = [_ids(tokenizer, format_prompt(examples_by_uid[u].problem, template)) for u in batch.uids]
  demo_refs = [[_ids(tokenizer, demos.demo_text(d, "thought"))[:max_response_len - 1] + [eos_id]
                for d in examples_by_uid[u].demos[:2]] for u in batch.uids]
  p = _pow2_bucket(max(len(x) for x in prompts), max_prompt_len)
  ld = _pow2_bucket(max(len(d) for pair in demo_refs for d in pair), max_response_len)
  assert batch.prompt_ids.shape == (g, p) and batch.prompt_ids.dtype == np.int32
  assert batch.demo_ids.shape == (g, 2, ld) and batch.demo_ids.dtype == np.int32
  assert batch.uids.dtype == np.int64 and batch.prompt_lens.dtype == np.int32 and batch.demo_lens.dtype == np.int32
  for i in range(g):
    assert batch.prompt_lens[i] == len(prompts[i])
    assert batch.prompt_ids[i].tolist() == prompts[i] + [pad_id] * (p - len(prompts[i]))
    for j in range(2):
      ref = demo_refs[i][j]
      assert batch.demo_lens[i, j] == len(ref)
      assert batch.demo_ids[i, j].tolist() == ref + [pad_id] * (ld - len(ref))
  assert batch.answers == [examples_by_uid[u].answer for u in batch.uids]
  assert batch.problems == [examples_by_uid[u].problem for u in batch.uids]


def test_loader_batches(tokenizer):
  examples = _examples(11)
  by_uid = {e.uid: e for e in examples}
  loader = pipeline.PromptLoader(examples, tokenizer, batch_size=4, max_prompt_len=256, max_response_len=4096,
                                 template="train", seed=None, require_demos=True, drop_remainder=False)
  batches = list(loader)
  assert [b.uids.tolist() for b in batches] == [[e.uid for e in examples[i:i + 4]] for i in (0, 4, 8)]
  widths = set()
  for b in batches:
    _check_batch(b, tokenizer, by_uid, template="train", max_prompt_len=256, max_response_len=4096,
                 pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    widths.add(b.prompt_ids.shape[1])
  assert all(w & (w - 1) == 0 and w >= 16 for w in widths)  # power-of-two buckets
  assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_loader_truncates_demos_and_keeps_eos(tokenizer):
  examples = _examples(4)
  max_response_len = 20
  loader = pipeline.PromptLoader(examples, tokenizer, batch_size=4, max_prompt_len=256,
                                 max_response_len=max_response_len, template="eval", seed=None,
                                 drop_remainder=False)
  batch = next(loader)
  assert batch.demo_ids.shape[-1] == max_response_len  # the bucket (32) is capped
  for i, e in enumerate(examples):
    for j in range(2):
      full = _ids(tokenizer, demos.demo_text(e.demos[j], "thought"))
      n = min(len(full), max_response_len - 1) + 1
      assert batch.demo_lens[i, j] == n
      assert batch.demo_ids[i, j, :n - 1].tolist() == full[:n - 1]
      assert batch.demo_ids[i, j, n - 1] == tokenizer.eos_token_id
  _check_batch(batch, tokenizer, {e.uid: e for e in examples}, template="eval", max_prompt_len=256,
               max_response_len=max_response_len, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)


def test_loader_filters_long_prompts(tokenizer, caplog):
  examples = _examples(12)
  lengths = [len(_ids(tokenizer, format_prompt(e.problem, "train"))) for e in examples]
  limit = int(np.median(lengths))
  too_long = [e.uid for e, n in zip(examples, lengths) if n > limit]
  assert too_long and len(too_long) < len(examples)
  with caplog.at_level(logging.INFO):
    loader = pipeline.PromptLoader(examples, tokenizer, batch_size=2, max_prompt_len=limit, max_response_len=64,
                                   template="train", seed=None, drop_remainder=False)
  assert [e.uid for e in loader.examples] == [e.uid for e, n in zip(examples, lengths) if n <= limit]
  lines = [r.getMessage() for r in caplog.records if "prompts longer than" in r.getMessage()]
  assert len(lines) == 1 and f"filtered {len(too_long)} of 12" in lines[0] and str(too_long) in lines[0]
  for b in loader:
    assert b.prompt_ids.shape[1] <= limit and b.prompt_lens.max() <= limit


def test_loader_pad_defaults_to_eos_and_eos_is_required(tokenizer):
  no_pad = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|im_end|>")
  assert no_pad.pad_token_id is None
  examples = _examples(3)
  batch = next(pipeline.PromptLoader(examples, no_pad, batch_size=3, max_prompt_len=256, max_response_len=512,
                                     template="train", seed=None, drop_remainder=False))
  _check_batch(batch, no_pad, {e.uid: e for e in examples}, template="train", max_prompt_len=256,
               max_response_len=512, pad_id=no_pad.eos_token_id, eos_id=no_pad.eos_token_id)
  no_eos = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(), name_or_path="tiny-bpe")
  with pytest.raises(ValueError, match="tiny-bpe.*eos_token_id"):
    pipeline.PromptLoader(examples, no_eos, batch_size=3, max_prompt_len=256, max_response_len=512,
                          template="train", seed=0)


def test_loader_demos_required_for_training(tokenizer):
  examples = _examples(4) + [pipeline.Example(uid=99, problem="What is 1?", answer="1")]
  with pytest.raises(ValueError, match="uid 99"):
    pipeline.PromptLoader(examples, tokenizer, batch_size=2, max_prompt_len=256, max_response_len=64,
                          template="train", seed=0)
  batches = list(pipeline.PromptLoader(examples, tokenizer, batch_size=2, max_prompt_len=256, max_response_len=64,
                                       template="eval", seed=None, require_demos=False, drop_remainder=False))
  assert [b.uids.tolist() for b in batches] == [[1, 4], [7, 10], [99]]
  assert batches[-1].demo_lens.tolist() == [[0, 0]]
  assert (batches[-1].demo_ids == tokenizer.pad_token_id).all()


def _uid_stream(loader, n: int) -> list[list[int]]:
  return [next(loader).uids.tolist() for _ in range(n)]


def test_loader_order_is_a_seeded_permutation_per_epoch(tokenizer):
  examples = _examples(10)
  kwargs = dict(batch_size=3, max_prompt_len=256, max_response_len=64, template="train")
  stream = _uid_stream(pipeline.PromptLoader(examples, tokenizer, seed=7, **kwargs), 9)  # 3 epochs of 3 batches
  for epoch in range(3):
    order = np.random.default_rng((7, epoch)).permutation(10)
    expected = [examples[i].uid for i in order[:9]]  # the last incomplete batch of each epoch is dropped
    assert sum(stream[3 * epoch:3 * epoch + 3], []) == expected
  assert stream == _uid_stream(pipeline.PromptLoader(examples, tokenizer, seed=7, **kwargs), 9)
  assert stream != _uid_stream(pipeline.PromptLoader(examples, tokenizer, seed=8, **kwargs), 9)


@pytest.mark.parametrize("stop", [1, 3, 4, 7])  # 3 batches an epoch: stops inside, at and after epoch boundaries
def test_loader_resumes_exactly(tokenizer, stop):
  examples = _examples(11)
  kwargs = dict(batch_size=3, max_prompt_len=256, max_response_len=64, template="train", seed=3)
  reference = pipeline.PromptLoader(examples, tokenizer, **kwargs)
  expected = [next(reference) for _ in range(stop + 5)]
  interrupted = pipeline.PromptLoader(examples, tokenizer, **kwargs)
  for _ in range(stop):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.state()))
  resumed = pipeline.PromptLoader(examples, tokenizer, **kwargs)
  resumed.restore(state)
  for want in expected[stop:]:
    got = next(resumed)
    for field in ("uids", "prompt_ids", "prompt_lens", "demo_ids", "demo_lens"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.answers == want.answers and got.problems == want.problems


def test_loader_rejects_bad_state(tokenizer):
  loader = pipeline.PromptLoader(_examples(6), tokenizer, batch_size=2, max_prompt_len=256, max_response_len=64,
                                 template="train", seed=0)
  with pytest.raises(ValueError, match="index"):
    loader.restore({"epoch": 0, "index": 7})
  with pytest.raises(ValueError, match="epoch"):
    loader.restore({"index": 0})


def test_loader_on_fixture(tokenizer, tmp_path):
  examples = pipeline.load_examples(_cfg(os.path.join(FIXTURES, "trapo_layout.parquet")), "train",
                                    data_dir=str(tmp_path))
  loader = pipeline.PromptLoader(examples, tokenizer, batch_size=4, max_prompt_len=1024, max_response_len=8192,
                                 template="train", seed=0)
  batch = next(loader)
  _check_batch(batch, tokenizer, {e.uid: e for e in examples}, template="train", max_prompt_len=1024,
               max_response_len=8192, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)


# ------------------------------------------------------------------------------------------------------ benchmarks

def test_benchmark_builder(tmp_path):
  benchmark_files = pytest.importorskip("trapo_jax.data.benchmark_files")
  examples = pipeline.load_benchmark_examples("aime24", data_dir=str(tmp_path))
  rows = benchmark_files.load_benchmark("aime24")
  assert len(examples) == 30 == len(rows)
  assert [e.uid for e in examples] == list(range(30))
  assert [(e.problem, e.answer) for e in examples] == [(r["problem"], r["answer"]) for r in rows]
  assert all(e.demos == () for e in examples)
  with pytest.raises(ValueError, match="'aime99'"):
    pipeline.load_benchmark_examples("aime99", data_dir=str(tmp_path))


def test_synthetic_source(tokenizer, tmp_path):
  synthetic = pytest.importorskip("trapo_jax.data.synthetic")
  cfg = ml_collections.ConfigDict(dict(source="synthetic", path=""))
  examples = pipeline.load_examples(cfg, "test", data_dir=str(tmp_path))
  builder = synthetic.Synthetic(data_dir=str(tmp_path))
  assert [e.uid for e in examples] == list(range(builder.info.splits["test"].num_examples))
  records = {int(r["uid"]): r for r in builder.as_data_source("test")}
  for e in examples:
    r = records[e.uid]
    assert (e.problem, e.answer, e.demos) == (r["problem"].decode(), r["answer"].decode(),
                                              tuple(d.decode() for d in r["demos"]))
    assert len(e.demos) >= 2
  batch = next(pipeline.PromptLoader(examples, tokenizer, batch_size=8, max_prompt_len=1024, max_response_len=8192,
                                     template="train", seed=0))
  _check_batch(batch, tokenizer, {e.uid: e for e in examples}, template="train", max_prompt_len=1024,
               max_response_len=8192, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
  with pytest.raises(ValueError, match="'validation'"):
    pipeline.load_examples(cfg, "validation", data_dir=str(tmp_path))
