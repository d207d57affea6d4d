"""The in-graph sampler: greedy exactness, HF generate parity, forced prefixes, sampling law, log-probs, sharding."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests import numerics
from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling import sampler as sampler_lib
from trapo_jax.sampling.sampler import Sampler, SamplingParams, bucket, sample_logits
from trapo_jax.train import trainer

CFG = tfm.ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, rope_theta=1000.0)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(tfm.init_params(CFG, jax.random.key(3)))


# Rows with different prompt and prefix lengths (right-padded inputs).
PROMPTS = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9], [10, 0, 0, 0, 0, 0], [11, 12, 0, 0, 0, 0]])
PROMPT_LENS = np.array([3, 6, 1, 2])
PREFIXES = np.array([[20, 21, 22], [0, 0, 0], [23, 0, 0], [24, 25, 0]])
PREFIX_LENS = np.array([3, 0, 1, 2])


_full_forward = jax.jit(lambda p, t, m: tfm.forward_logits(p, CFG, t, m))


# Logits of two fp32 computations of this model (cache or not, sharded or not, JAX or PyTorch) agree within this;
# the parity tests of tests/test_model.py hold them to it. Greedy choices are compared where it cannot flip them.
LOGIT_TOL = 1e-4


def _greedy_reference(params, prompt, prefix, width):
  """Step-by-step argmax of the full forward pass (no cache), right-padded to one width so it compiles once.

  -> (response tokens [width], logits [width, V] each step chose from; prefix steps get the logits at their place)
  """
  seq, resp, logits_at = list(prompt), [], []
  while len(resp) < width:
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(seq)] = seq
    logits = np.asarray(_full_forward(params, jnp.asarray(tokens), jnp.asarray(np.arange(32)[None] < len(seq))))
    logits_at.append(logits[0, len(seq) - 1])
    forced = len(resp) < len(prefix)
    seq.append(int(prefix[len(resp)]) if forced else int(np.argmax(logits_at[-1])))
    resp.append(seq[-1])
  return resp, np.stack(logits_at)


def _teacher_forced_logits(params, prompts, prompt_lens, responses):
  """Logits [B, L, V] that chose each response token, by the full forward pass over prompt + response."""
  b, width = responses.shape
  seq = np.zeros((b, 32), np.int32)
  for i in range(b):
    seq[i, :prompt_lens[i]] = prompts[i, :prompt_lens[i]]
    seq[i, prompt_lens[i]:prompt_lens[i] + width] = responses[i]
  logits = np.asarray(_full_forward(params, jnp.asarray(seq), jnp.asarray(np.arange(32)[None] < 32)))
  return np.stack([logits[i, prompt_lens[i] - 1:prompt_lens[i] - 1 + width] for i in range(b)])


# The decode loop in one segment (these tests' budgets, as short as a test run's) and in 4 (segments of 1 step at
# least: a 10-step budget ends its segments at steps 3, 5, 8 and 10, each attending to fewer slots than the next).
SEGMENTS = pytest.mark.parametrize("segment_steps", [sampler_lib._SEGMENT_MIN_STEPS, 1])  # pylint: disable=protected-access


def test_a_budget_splits_into_segments_of_the_minimum_length_or_more(monkeypatch):
  monkeypatch.setattr(sampler_lib, "_SEGMENT_MIN_STEPS", 16)
  assert [sampler_lib.segment_stops(b) for b in (1, 24, 32, 48, 96, 8192)] == [
      [1], [24], [16, 32], [16, 32, 48], [24, 48, 72, 96], [2048, 4096, 6144, 8192]]
  monkeypatch.setattr(sampler_lib, "_SEGMENT_MIN_STEPS", 1)
  assert sampler_lib.segment_stops(10) == [3, 5, 8, 10]


@SEGMENTS
def test_greedy_equals_stepwise_argmax_with_forced_prefixes(params, segment_steps, monkeypatch):
  monkeypatch.setattr(sampler_lib, "_SEGMENT_MIN_STEPS", segment_steps)
  out = Sampler(CFG).sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=10, rng=jax.random.key(0),
                            temperature=0.0)
  refs = [_greedy_reference(params, PROMPTS[i, :PROMPT_LENS[i]], PREFIXES[i, :PREFIX_LENS[i]], 10) for i in range(4)]
  forced = np.asarray(out.prefix_mask)
  numerics.assert_greedy_agrees(out.tokens, [r[0] for r in refs], np.stack([r[1] for r in refs]), LOGIT_TOL,
                                forced=forced)
  # The prefix is there verbatim and the mask marks exactly its tokens.
  for i in range(4):
    assert np.asarray(out.tokens[i, :PREFIX_LENS[i]]).tolist() == PREFIXES[i, :PREFIX_LENS[i]].tolist()
    assert forced[i].tolist() == [j < PREFIX_LENS[i] for j in range(10)]
  np.testing.assert_array_equal(out.lengths, 10)
  assert not np.asarray(out.eos).any()


def test_continuation_cap_bounds_what_each_row_generates(params):
  """continuation=c (a prefix in the prompt's budget, Prefix-RFT's): every row generates c tokens behind its prefix,
  whatever the prefix's length, within rows as wide as max_len; the tokens are the greedy ones, and the row did not
  end with EOS (truncated). One pass over shared contexts caps alike."""
  sampler = Sampler(CFG)
  out = sampler.sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=10, rng=jax.random.key(0),
                       temperature=0.0, continuation=3)
  lengths = PREFIX_LENS + 3
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_array_equal(out.response_mask, np.arange(10)[None] < lengths[:, None])
  assert not np.asarray(out.eos).any()
  refs = [_greedy_reference(params, PROMPTS[i, :PROMPT_LENS[i]], PREFIXES[i, :PREFIX_LENS[i]], 10) for i in range(4)]
  mask = np.asarray(out.response_mask)
  numerics.assert_greedy_agrees(np.where(mask, out.tokens, 0), np.where(mask, np.stack([r[0] for r in refs]), 0),
                                np.stack([r[1] for r in refs]), LOGIT_TOL, forced=np.asarray(out.prefix_mask) | ~mask)
  shared = sampler.sample_shared(params, PROMPTS, PROMPT_LENS, SHARED_PREFIXES, SHARED_PREFIX_LENS,
                                 branches=BRANCHES, row_ids=np.zeros((4, 5), np.int32),
                                 sample_ids=np.zeros((4, 5), np.int32), max_len=10, rng=jax.random.key(0),
                                 temperature=0.0, continuation=2)
  contexts = np.concatenate([np.zeros((4, 1), np.int64), SHARED_PREFIX_LENS], 1)[:, list(BRANCHES)].reshape(-1)
  np.testing.assert_array_equal(shared.lengths, contexts + 2)
  assert Sampler.shared_shapes(PROMPT_LENS, SHARED_PREFIX_LENS, BRANCHES, 10, continuation=2)[3] == 2
  assert Sampler.shared_shapes(PROMPT_LENS, SHARED_PREFIX_LENS, BRANCHES, 10)[3] == 10  # no cap: up to max_len


def test_greedy_equals_transformers_generate(params, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from trapo_jax.models import hf
  hf.save_hf(str(tmp_path), CFG, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  width = PROMPTS.shape[1]
  left = np.zeros_like(PROMPTS)
  attn = np.zeros_like(PROMPTS)
  for i, n in enumerate(PROMPT_LENS):
    left[i, width - n:] = PROMPTS[i, :n]
    attn[i, width - n:] = 1
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(attn), max_new_tokens=12,
                         do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                         return_dict_in_generate=True)
  ref_tokens = ref.sequences[:, width:].numpy()
  ref_logits = torch.stack(ref.scores, 1).numpy()  # [B, 12, V]: greedy applies no processor, these are the logits
  out = Sampler(CFG).sample(params, PROMPTS, PROMPT_LENS, max_len=12, rng=jax.random.key(0), temperature=0.0)
  numerics.assert_greedy_agrees(out.tokens, ref_tokens, ref_logits, LOGIT_TOL)


def test_eos_ends_rows_and_later_tokens_are_padding(params):
  sampler = Sampler(CFG)
  free = sampler.sample(params, PROMPTS, PROMPT_LENS, max_len=10, rng=jax.random.key(0), temperature=0.0)
  # Make the token each row emits at step 2 its EOS: the row must stop right there.
  eos = int(free.tokens[0, 2])
  out = sampler.sample(params, PROMPTS, PROMPT_LENS, max_len=10, rng=jax.random.key(0), temperature=0.0,
                       eos_ids=(eos,), pad_id=47)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
  for i in range(4):
    row = np.asarray(free.tokens[i]).tolist()
    stop = row.index(eos) + 1 if eos in row else 10
    assert tokens[i, :stop].tolist() == row[:stop]
    assert (tokens[i, stop:] == 47).all()
    assert mask[i].tolist() == [j < stop for j in range(10)]
    assert int(out.lengths[i]) == stop and bool(out.eos[i]) == (eos in row)
  assert np.asarray(out.logprobs)[~mask].max(initial=0) == 0


def test_prefix_ending_in_eos_and_inactive_rows_generate_nothing(params):
  prefixes = np.array([[20, 21, 5], [22, 23, 24], [0, 0, 0], [25, 0, 0]])
  out = Sampler(CFG).sample(params, PROMPTS, PROMPT_LENS, prefixes, np.array([3, 3, 0, 1]),
                            active=np.array([True, False, True, True]), max_len=8, rng=jax.random.key(1),
                            eos_ids=(5,), temperature=1.0)
  assert np.asarray(out.lengths)[:2].tolist() == [3, 3]  # EOS-terminated prefix; an inactive row (full expert)
  assert bool(out.eos[0]) and not bool(out.eos[1])
  assert np.asarray(out.tokens[1, :3]).tolist() == [22, 23, 24]
  assert np.asarray(out.response_mask[1]).sum() == 3


def test_n_samples_share_prefill_and_are_prompt_major(params):
  sampler = Sampler(CFG)
  out = sampler.sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=8, rng=jax.random.key(0),
                       n=3, temperature=1.0)
  assert out.tokens.shape == (12, 8)
  for i in range(4):
    for j in range(3):
      assert np.asarray(out.tokens[3 * i + j, :PREFIX_LENS[i]]).tolist() == PREFIXES[i, :PREFIX_LENS[i]].tolist()
  assert len({tuple(np.asarray(out.tokens[r])) for r in range(12)}) > 4  # samples differ
  again = sampler.sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=8, rng=jax.random.key(0),
                         n=3, temperature=1.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))  # deterministic per rng


def test_similar_lengths_never_recompile(params):
  sampler = Sampler(CFG)
  rng = np.random.default_rng(0)
  for call in range(6):
    lens = rng.integers(3, 7, size=4)  # contexts of 3..6(+prefix) tokens: all in the 16-bucket
    sampler.sample(params, PROMPTS, lens, PREFIXES, np.minimum(PREFIX_LENS, 2), max_len=10,
                   rng=jax.random.key(call), temperature=1.0)
  assert sampler.traces == {"prefill": 1, "decode": 1}
  # A much longer context is a new bucket: exactly one more compile of each.
  long = np.ones((4, 20), np.int32)
  sampler.sample(params, long, np.full((4,), 20), max_len=10, rng=jax.random.key(9), temperature=1.0)
  assert sampler.traces == {"prefill": 2, "decode": 2}
  assert bucket(5) == 16 and bucket(17) == 32 and bucket(100, cap=64) == 64


def test_first_token_distribution_matches_softmax(params):
  """Chi-square goodness of fit of 4000 first tokens against softmax(logits / T)."""
  cfg = CFG.replace(vocab_size=8)
  p = nn.unbox(tfm.init_params(cfg, jax.random.key(5)))
  # Spread the logits so every token has visible mass.
  p["params"]["embed"]["embedding"] = p["params"]["embed"]["embedding"] * 20.0
  prompt = np.array([[1, 2, 3]])
  temperature = 0.7
  logits = tfm.forward_logits(p, cfg, jnp.asarray(prompt), jnp.ones((1, 3), bool))[0, -1]
  probs = np.asarray(jax.nn.softmax(logits / temperature), np.float64)
  assert probs.min() > 0.005 and probs.max() < 0.9
  n = 4000
  out = Sampler(cfg).sample(p, prompt, np.array([3]), max_len=1, rng=jax.random.key(11), n=n, temperature=temperature)
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=8)
  chi2 = float((((counts - n * probs) ** 2) / (n * probs)).sum())
  assert chi2 < 24.32, (chi2, counts, n * probs)  # chi-square critical value, 7 degrees of freedom, p = 0.001
  # Log-probs returned for the sampled tokens are those of softmax(logits / T).
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs)[np.asarray(out.tokens[:, 0])], atol=1e-5)


def test_top_k_and_top_p_never_emit_excluded_tokens():
  logits = jnp.log(jnp.asarray([[0.05, 0.3, 0.02, 0.25, 0.08, 0.2, 0.1]]))
  logits = jnp.tile(logits, (3000, 1))
  top_k = np.asarray(sample_logits(jax.random.key(0), logits, 1.0, 3, 1.0))
  assert set(top_k.tolist()) == {1, 3, 5}
  # top_p 0.6: sorted masses 0.3, 0.25, 0.2 -> {1, 3} has 0.55 < 0.6, so 5 is needed too; 6 (0.1) is out.
  top_p = np.asarray(sample_logits(jax.random.key(1), logits, 1.0, -1, 0.6))
  assert set(top_p.tolist()) == {1, 3, 5}
  top_p = np.asarray(sample_logits(jax.random.key(2), logits, 1.0, -1, 0.5))
  assert set(top_p.tolist()) == {1, 3}
  greedy = np.asarray(sample_logits(jax.random.key(3), logits, 0.0, -1, 1.0))
  assert (greedy == 1).all()


@SEGMENTS
def test_logprobs_equal_trainer_recomputation(params, segment_steps, monkeypatch):
  from trapo_jax.train import step as step_lib
  monkeypatch.setattr(sampler_lib, "_SEGMENT_MIN_STEPS", segment_steps)
  out = Sampler(CFG).sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=10, rng=jax.random.key(4),
                            n=2, temperature=1.0)
  rows = np.repeat(np.arange(4), 2)
  resp_lens = np.asarray(out.lengths)
  t = PROMPTS.shape[1] + 10
  seq = np.zeros((8, t), np.int32)
  mask = np.zeros((8, t), bool)
  for r in range(8):
    lp = PROMPT_LENS[rows[r]]
    seq[r, :lp] = PROMPTS[rows[r], :lp]
    seq[r, lp:lp + resp_lens[r]] = np.asarray(out.tokens[r, :resp_lens[r]])
    mask[r, :lp + resp_lens[r]] = True
  mb = dict(seq_tokens=jnp.asarray(seq), seq_mask=jnp.asarray(mask), resp_start=jnp.asarray(PROMPT_LENS[rows]),
            resp_tokens=out.tokens)
  logp, _ = step_lib.response_logprobs(params, CFG, mb, chunk_size=4)
  own = np.asarray(out.response_mask & ~out.prefix_mask)
  np.testing.assert_allclose(np.asarray(logp)[own], np.asarray(out.logprobs)[own], atol=1e-4)


def test_pad_id_generated_mid_response_is_a_token_to_sampler_and_trainer(params):
  """A row may draw the pad id before its end (a pad id that is not EOS). The sampler feeds it back like any token
  it drew, attended (sampler.py's decode step writes every drawn token with a true mask), and keeps it in the
  response mask; step.pack lays a row out by its length, never by token values, so the trainer's recomputation
  attends to it too, and its log-probs are the sampler's: the mismatch metric stays at float32 noise. Were either
  side to mask it (as Tunix's sampler does), the tokens behind it would be scored in another context."""
  from trapo_jax import losses
  from trapo_jax.sampling import rollout
  from trapo_jax.train import step as step_lib
  sampler = Sampler(CFG)
  draw = lambda pad: sampler.sample(params, PROMPTS, PROMPT_LENS, max_len=10, rng=jax.random.key(5), temperature=1.0,
                                    pad_id=pad)
  free = draw(47)
  pad = int(free.tokens[0, 3])  # what row 0 draws at its 4th step becomes the pad id: 6 tokens follow it
  out = draw(pad)
  tokens, resp = np.asarray(out.tokens), np.asarray(out.response_mask)
  assert pad != 47 and tokens[0, 3] == pad and resp[0].all()
  # The pad id changes nothing the rows drew, nor the log-probs of the tokens behind it.
  np.testing.assert_array_equal(tokens, np.asarray(free.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(free.logprobs), atol=1e-6)
  n = len(PROMPTS)
  rb = rollout.RolloutBatch(
      prompt_ids=PROMPTS, prompt_lens=PROMPT_LENS, tokens=tokens, prefix_mask=np.zeros_like(resp),
      off_loss_mask=np.zeros_like(resp), response_mask=resp, rewards=np.zeros(n, np.float32),
      group_ids=np.arange(n, dtype=np.int32), stage=np.zeros(n, np.int32), ratio=np.zeros(n, np.float32),
      levels=np.zeros((n, 1), np.int32), kind=np.full(n, losses.ROW_OWN, np.int32),
      logprobs=np.asarray(out.logprobs))
  packed = step_lib.pack(rb, np.ones(n, np.float32), token_budget=1 << 16, shards=1, pad_id=pad)
  assert packed.seq_mask[0, 0, PROMPT_LENS[0] + 3]  # the trainer attends to the drawn pad id
  objective = losses.Objective(terms=(losses.Term("pg", "own", "policy_gradient", aggregation="token_mean"),))
  mb = jax.tree.map(lambda x: jnp.asarray(x[0]), packed.arrays())
  _, metrics = step_lib.loss_fn(params, mb, objective.weights_at(0), model_cfg=CFG, objective=objective,
                                chunk_size=4)
  assert float(metrics["mismatch/abs_logp_max"].value) < 1e-4


def test_sharded_greedy_equals_single_device(params):
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  boxed = jax.eval_shape(lambda: tfm.init_params(CFG, jax.random.key(3)))
  placed = sharding.put_global(params, sharding.logical_shardings(boxed, mesh))
  prompts = np.concatenate([PROMPTS, PROMPTS[::-1]])
  prompt_lens = np.concatenate([PROMPT_LENS, PROMPT_LENS[::-1]])
  args = (prompts, prompt_lens, np.concatenate([PREFIXES, PREFIXES[::-1]]),
          np.concatenate([PREFIX_LENS, PREFIX_LENS[::-1]]))
  single = Sampler(CFG).sample(params, *args, max_len=10, rng=jax.random.key(0), temperature=0.0)
  sharded = Sampler(CFG, mesh=mesh).sample(placed, *args, max_len=10, rng=jax.random.key(0), temperature=0.0)
  tokens = np.asarray(single.tokens)
  numerics.assert_greedy_agrees(sharded.tokens, tokens, _teacher_forced_logits(params, prompts, prompt_lens, tokens),
                                LOGIT_TOL, forced=np.asarray(single.prefix_mask))
  # Log-probs where both chose the same tokens so far: the same computation on another layout. A log-softmax moves
  # at most twice as far as the logits it is taken of.
  same = np.cumprod(np.asarray(sharded.tokens) == tokens, axis=1).astype(bool)
  np.testing.assert_allclose(np.asarray(sharded.logprobs)[same], np.asarray(single.logprobs)[same], rtol=0,
                             atol=2 * LOGIT_TOL)


def _loop_collectives(hlo: str) -> list[tuple[str, str, str]]:
  """(op, result type, op_name) of each collective in compiled HLO text that sits in a while loop's body or
  condition."""
  names = {n for pair in re.findall(r"condition=%([\w.\-]+), body=%([\w.\-]+)", hlo) for n in pair}
  found = []
  for block in re.split(r"\n(?=\S)", hlo):  # a computation starts at column 0
    head = re.match(r"%([\w.\-]+) ", block)
    if head and head.group(1) in names:
      found += re.findall(r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)[\w-]*\("
                          r".*?op_name=\"([^\"]*)\"", block)
  return [(op, shape, name) for shape, op, name in found]


@pytest.mark.parametrize("gather_weights", [False, True])
def test_a_sharded_decode_step_exchanges_no_rows_and_gathers_weights_once_if_asked(gather_weights):
  """On a mesh the rows of a decode are split over the batch shards and each is decoded on its device: inside the
  decode loop the sampler's own work moves no rows between devices (24 here, 3 a device: an axis no weight has);
  the collectives are the condition's all-reduce of `every row is done` and, unless the weights were gathered once
  before the loop, what XLA makes of the model's layers over fsdp-sharded weights: their gathers, and for the
  embedding lookup in a table split along its width, a gather of the rows' token ids."""
  mesh = sharding.make_mesh(shape=(1, 8, 1))
  boxed = jax.eval_shape(lambda: tfm.init_params(CFG, jax.random.key(3)))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                          sharding.logical_shardings(boxed, mesh))
  sampler = Sampler(CFG, mesh=mesh, gather_weights=gather_weights)
  _, decode = sampler.lower(abstract, prompts=24, prompt_len=8, max_len=40, width=16, budget=40, n=1,
                            sp=SamplingParams(eos_ids=(2,)))
  hlo = decode.compile().as_text()
  inside = _loop_collectives(hlo)
  condition = [c for c in inside if c[:2] == ("all-reduce", "pred[]") and "/while/cond/" in c[2]]
  assert condition  # the pattern sees into the loop
  rows = [c for c in inside if re.search(r"[\[,]24\b", c[1])]
  assert not [c for c in rows if "/Decoder/" not in c[2]], rows  # the sampler's own steps: none
  if gather_weights:
    assert inside == condition, inside
    assert "all-gather" in hlo  # once, before the loop
  else:
    assert [c for c in inside if c[0] == "all-gather" and c[1].startswith("f32[")]  # the layers' weights


def test_runs_in_one_process_share_the_sampler_of_their_arguments(params, tmp_path):
  """trainer.build_context takes Sampler.shared: a second run of the same model reuses the programs the first traced
  (no new trace for the same shapes); another mesh or gather setting gets a sampler of its own."""
  mesh = sharding.make_mesh(shape=(1, 8, 1))
  first = Sampler.shared(CFG)
  assert Sampler.shared(CFG) is first and Sampler.shared(CFG, mesh=mesh) is not first
  assert Sampler.shared(CFG, mesh=mesh, gather_weights=True) is not Sampler.shared(CFG, mesh=mesh)
  args = (params, PROMPTS, PROMPT_LENS)
  first.sample(*args, max_len=10, rng=jax.random.key(0), temperature=0.0)
  traced = dict(first.traces)
  Sampler.shared(CFG).sample(*args, max_len=10, rng=jax.random.key(1), temperature=0.0)
  assert first.traces == traced
  a, b = (trainer.build_context(helpers.tiny(helpers.config_of(), str(tmp_path / d)), str(tmp_path / d)).sampler
          for d in ("a", "b"))
  assert a is b


def test_gathered_weights_sample_what_sharded_weights_sample(params):
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  boxed = jax.eval_shape(lambda: tfm.init_params(CFG, jax.random.key(3)))
  placed = sharding.put_global(params, sharding.logical_shardings(boxed, mesh))
  outs = [Sampler(CFG, mesh=mesh, gather_weights=g).sample(placed, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS,
                                                           max_len=10, rng=jax.random.key(5), n=2, temperature=1.0)
          for g in (False, True)]
  jax.tree.map(np.testing.assert_array_equal, *outs)  # the same weights, gathered earlier: the same computation


# Shared prefill (one pass over several contexts of a prompt): two prefixes per prompt, of other lengths than the
# prompts', one of them empty; branches: 0 the bare prompt, b prefix b - 1.
SHARED_PREFIXES = np.array([[[20, 21, 22], [30, 31, 32]], [[0, 0, 0], [33, 0, 0]], [[23, 0, 0], [24, 25, 26]],
                            [[24, 25, 0], [27, 28, 0]]])
SHARED_PREFIX_LENS = np.array([[3, 3], [0, 1], [1, 3], [2, 2]])
BRANCHES = (0, 0, 1, 2, 1)


def _shared(sampler, params, temperature, n_prompts=4):
  ids = 10 * np.arange(n_prompts)[:, None] + np.arange(len(BRANCHES))[None]
  samples = np.tile([0, 1, 0, 0, 1], (n_prompts, 1))
  return sampler.sample_shared(params, PROMPTS[:n_prompts], PROMPT_LENS[:n_prompts], SHARED_PREFIXES[:n_prompts],
                               SHARED_PREFIX_LENS[:n_prompts], branches=BRANCHES, row_ids=ids, sample_ids=samples,
                               max_len=10, rng=jax.random.key(0), temperature=temperature), ids, samples


def _each_context(sampler, params, temperature, ids, samples):
  """The reference: every row from `sample`, its context (prompt + its prefix) prefilled on its own, keyed alike."""
  rows = []
  for r, b in enumerate(BRANCHES):
    prefixes = SHARED_PREFIXES[:, max(b - 1, 0)] * (b > 0)  # one shape for every branch: one compile
    lens = SHARED_PREFIX_LENS[:, max(b - 1, 0)] * (b > 0)
    out = sampler.sample(params, PROMPTS, PROMPT_LENS, prefixes, lens, max_len=10, rng=jax.random.key(0),
                         row_ids=ids[:, r], n=2, temperature=temperature)
    rows.append(jax.tree.map(lambda x: np.asarray(x).reshape((4, 2) + x.shape[1:])[:, samples[0, r]], out))
  return jax.tree.map(lambda *x: np.stack(x, 1).reshape((-1,) + x[0].shape[1:]), *rows)


def test_shared_prefill_equals_prefilling_each_context(params):
  sampler = Sampler(CFG)
  out, ids, samples = _shared(sampler, params, 0.0)
  ref = _each_context(sampler, params, 0.0, ids, samples)
  prompts, lens = np.repeat(PROMPTS, len(BRANCHES), 0), np.repeat(PROMPT_LENS, len(BRANCHES))
  numerics.assert_greedy_agrees(out.tokens, ref.tokens, _teacher_forced_logits(params, prompts, lens, ref.tokens),
                                LOGIT_TOL, forced=ref.prefix_mask)
  np.testing.assert_array_equal(out.prefix_mask, ref.prefix_mask)  # each row's own prefix, verbatim
  np.testing.assert_array_equal(np.asarray(out.tokens)[ref.prefix_mask], ref.tokens[ref.prefix_mask])
  assert sampler.traces["prefill_shared"] == 1
  # Sampled: the same keys draw the same tokens from logits that differ only by rounding. A draw flips only where
  # two perturbed logits lie within that rounding (about 1e-6) of each other, which almost never happens in 200
  # draws: a row's tokens do not depend on the call that produced them.
  out, ids, samples = _shared(sampler, params, 1.0)
  ref = _each_context(sampler, params, 1.0, ids, samples)
  same = (np.asarray(out.tokens) == ref.tokens).all(1)
  assert same.mean() >= 0.9, same
  assert len({tuple(t) for t in ref.tokens}) > 12  # the keys do differ between rows


def test_shared_prefill_sharded_equals_single_device(params):
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  boxed = jax.eval_shape(lambda: tfm.init_params(CFG, jax.random.key(3)))
  placed = sharding.put_global(params, sharding.logical_shardings(boxed, mesh))
  single, _, _ = _shared(Sampler(CFG), params, 1.0, n_prompts=3)  # 3 prompts: padded to the 4 batch shards
  sharded, _, _ = _shared(Sampler(CFG, mesh=mesh), placed, 1.0, n_prompts=3)
  assert sharded.tokens.shape == (15, 10)
  same = (np.asarray(sharded.tokens) == np.asarray(single.tokens)).all(1)
  assert same.mean() >= 0.9, same  # as above: a sampled token flips only on a near-tie of perturbed logits
  np.testing.assert_array_equal(sharded.prefix_mask, single.prefix_mask)


def test_blockwise_prefill_samples_what_the_dense_prefill_samples(params):
  """A prefill longer than attention_block attends one block of queries at a time (tfm.blockwise_cached_attention):
  contexts of 16 slots in blocks of 4 against all 16 queries at once, through `sample` and through `sample_shared`
  (whose prefix extension attends to the prompt's cache as well)."""
  blocked, dense = Sampler(CFG.replace(attention_block=4)), Sampler(CFG)
  for temperature in (0.0, 1.0):
    one = [s.sample(params, PROMPTS, PROMPT_LENS, PREFIXES, PREFIX_LENS, max_len=10, rng=jax.random.key(4), n=2,
                    temperature=temperature) for s in (blocked, dense)]
    shared = [_shared(s, params, temperature)[0] for s in (blocked, dense)]
    for (new, old), rows in ((one, 2), (shared, len(BRANCHES))):
      tokens = np.asarray(old.tokens)
      np.testing.assert_array_equal(new.prefix_mask, old.prefix_mask)
      if temperature == 0.0:
        logits = _teacher_forced_logits(params, np.repeat(PROMPTS, rows, 0), np.repeat(PROMPT_LENS, rows), tokens)
        numerics.assert_greedy_agrees(new.tokens, tokens, logits, LOGIT_TOL, forced=np.asarray(old.prefix_mask))
      else:  # the same keys draw the same tokens, but where rounding flips a near-tie (see above)
        assert (np.asarray(new.tokens) == tokens).all(1).mean() >= 0.9
      same = np.cumprod(np.asarray(new.tokens) == tokens, axis=1).astype(bool)
      np.testing.assert_allclose(np.asarray(new.logprobs)[same], np.asarray(old.logprobs)[same], rtol=0,
                                 atol=2 * LOGIT_TOL)


def test_a_long_prefill_holds_one_block_of_scores_at_a_time():
  """XLA's memory plan of the compiled prefill of 2 contexts of 2048 tokens (a 1024-token budget behind them): in
  blocks of 128 queries its temporaries stay below a quarter of the [B, H, T, T] fp32 scores that attending all
  queries at once holds, and the dense prefill's do not."""
  sp = SamplingParams(0.0, 1.0, -1, (0,), 0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(tfm.abstract_params(CFG)))

  def temporaries(block):
    prefill, _ = Sampler(CFG.replace(attention_block=block)).lower(
        abstract, prompts=2, prompt_len=2048, max_len=1024, width=2048, budget=1024, n=1, sp=sp)
    return prefill.compile().memory_analysis().temp_size_in_bytes

  scores = 2 * CFG.num_heads * 2048 * 2048 * 4
  assert temporaries(128) < scores / 4
  assert temporaries(2048) >= scores
