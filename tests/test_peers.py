"""benchmarks.peers: without Tunix it says so in one line and exits 0; the arithmetic of its interleaved pairs; with
Tunix installed (never in CI), the weight copy makes Tunix's Qwen2 compute trapo_jax's logits."""

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import peers
from benchmarks import step_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_tunix_one_line_and_exit_0():
  # sys.modules["tunix"] = None makes `import tunix` fail as if it were not installed, wherever the test runs.
  code = ("import sys, runpy; sys.modules['tunix'] = None; sys.argv = ['peers', '--quick'];"
          "runpy.run_module('benchmarks.peers', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines() == [peers.INSTALL_LINE]
  assert "pip install -r benchmarks/requirements-peers.txt" in peers.INSTALL_LINE
  assert os.path.exists(os.path.join(ROOT, "benchmarks", "requirements-peers.txt"))


def test_pair_figures_against_numpy():
  rng = np.random.default_rng(3)
  ours, theirs = rng.uniform(1.0, 3.0, 7), rng.uniform(1.0, 3.0, 7)
  work = 16 * 128
  r = peers.pair_figures(list(ours), list(theirs), work)
  # Independent: each pair's speed ratio from the speeds themselves, medians by sorting (odd count: the middle one).
  speed_ratio = [(work / ours[i]) / (work / theirs[i]) for i in range(7)]
  assert r["pairs"] == 7
  assert r["ratio"] == pytest.approx(sorted(speed_ratio)[3], rel=1e-12)
  assert r["ratio_range"] == pytest.approx([min(speed_ratio), max(speed_ratio)], rel=1e-12)
  assert r["ours_s"] == pytest.approx(sorted(ours)[3]) and r["theirs_s"] == pytest.approx(sorted(theirs)[3])
  assert r["ours_per_s"] == pytest.approx(work / sorted(ours)[3])
  assert r["theirs_per_s"] == pytest.approx(work / sorted(theirs)[3])
  # An even count: the mean of the two middle pairs' ratios, not the ratio of the two sides' medians.
  r = peers.pair_figures([1.0, 2.0, 4.0, 1.0], [2.0, 2.0, 2.0, 4.0], 1.0)
  assert r["ratio"] == pytest.approx((1.0 + 2.0) / 2)
  assert r["ratio"] != pytest.approx(r["theirs_s"] / r["ours_s"])
  with pytest.raises(ValueError):
    peers.pair_figures([1.0, 2.0], [1.0], 1.0)


def test_interleave_alternates_the_sides():
  calls = []
  a, b = peers.interleave(lambda: calls.append("a"), lambda: calls.append("b"), 3)
  assert calls == ["a", "b"] * 3 and len(a) == len(b) == 3


def test_table_marks_a_row_that_was_not_timed():
  result = {"tunix": "0.1.7", "rows": [
      {"label": "sampling, batch 16", "kind": "sample", **peers.pair_figures([2.0, 2.0, 2.0], [3.0, 2.4, 2.6], 2048)},
      {"label": "forward+backward, 16 rows", "kind": "train", "error": "loss: trapo_jax 1, Tunix 2"}]}
  md = peers.table(result)
  assert "| sampling, batch 16 | 1024 tok/s | 788 tok/s | **1.30x** (median of 3 pairs; 1.20-1.50) |" in md
  assert "| forward+backward, 16 rows | not timed: loss: trapo_jax 1, Tunix 2 |" in md


def test_weight_copy_gives_tunix_the_same_logits():
  """Only where Tunix is installed (benchmarks/requirements-peers.txt): skipped in CI."""
  pytest.importorskip("tunix")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from trapo_jax.models import transformer as tfm
  for tie in (False, True):
    cfg = tfm.ModelConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, tie_embeddings=tie)
    params = nn.unbox(tfm.init_params(cfg, jax.random.key(1)))
    # Non-zero biases and norms, so that a bias or a norm copied to the wrong place shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    model = peers.tunix_model(cfg, params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(tfm.forward_logits(params, cfg, jnp.asarray(tokens), jnp.ones(tokens.shape, bool)))
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None].repeat(2, 0)
    theirs, _ = model(jnp.asarray(tokens), jnp.arange(t)[None].repeat(2, 0), None, causal)
    np.testing.assert_allclose(np.asarray(theirs), ours, atol=2e-5, rtol=1e-4)


def _tiny():
  import flax.linen as nn
  import jax
  from trapo_jax.models import transformer as tfm
  cfg = tfm.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8)
  return cfg, nn.unbox(tfm.init_params(cfg, jax.random.key(0)))


def test_train_check_refuses_a_gradient_that_differs():
  """check_train names the leaf whose gradient differs beyond the tolerance (Tunix's side faked from ours, so no
  Tunix is needed); the same gradients pass."""
  import jax
  from flax import nnx, traverse_util
  cfg, params = _tiny()
  grads = jax.tree.map(lambda x: np.asarray(x) + 0.01, params)
  theirs = traverse_util.unflatten_dict(peers.to_tunix(grads, cfg))
  logps = (np.full((2, 3), -4.0, np.float32), np.full((2, 3), -4.0, np.float32))
  ok = peers.check_train(cfg, (0.5, grads, {}), (0.5, nnx.State(theirs), {}), logps, rtol=1e-3)
  assert ok["grad_max_rel"] == 0.0 and ok["logp_max_abs"] == 0.0
  theirs["layers"][1]["mlp"]["up_proj"]["kernel"] = theirs["layers"][1]["mlp"]["up_proj"]["kernel"] * 1.01
  with pytest.raises(peers.Mismatch, match="gradient of layers/1/mlp/up_proj/kernel"):
    peers.check_train(cfg, (0.5, grads, {}), (0.5, nnx.State(theirs), {}), logps, rtol=1e-3)
  with pytest.raises(peers.Mismatch, match="loss"):
    peers.check_train(cfg, (0.5, grads, {}), (0.6, nnx.State(theirs), {}), logps, rtol=1e-3)
  with pytest.raises(peers.Mismatch, match="log-probs"):
    peers.check_train(cfg, (0.5, grads, {}), (0.5, nnx.State(theirs), {}), (logps[0], logps[1] + 0.1), rtol=1e-3)


def test_greedy_check_accepts_only_an_argmax_tie():
  """Rows may part only where the two tokens' logits after the common prefix are within logit_tol."""
  import jax.numpy as jnp
  from trapo_jax.models import transformer as tfm
  cfg, params = _tiny()
  prompts = np.array([[5, 9, 11], [7, 3, 2]], np.int32)
  ours = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
  assert peers.check_greedy(cfg, params, prompts, ours, ours.copy(), 1e-4) == {"rows_equal": 2, "ties": []}
  seq = np.concatenate([prompts[1], ours[1, :1]])[None]
  logits = np.asarray(tfm.forward_logits(params, cfg, jnp.asarray(seq), jnp.ones(seq.shape, bool)))[0, -1]
  theirs = ours.copy()
  theirs[1, 1:] = [9, 9]
  gap = abs(float(logits[ours[1, 1]] - logits[9]))
  with pytest.raises(peers.Mismatch, match="row 1 differs at generated token 1"):
    peers.check_greedy(cfg, params, prompts, ours, theirs, logit_tol=gap / 2)
  tie = peers.check_greedy(cfg, params, prompts, ours, theirs, logit_tol=gap * 2)
  assert tie["rows_equal"] == 1 and tie["ties"][0]["row"] == 1 and tie["ties"][0]["step"] == 1


def test_step_profile_sorts_each_op_by_pass_part_and_kind():
  """XLA:CPU thunks are joined by name to the compiled HLO's op_name, which says the pass, the part and the kind."""
  hlo = ("\n  %copy_bitcast_fusion.9 = f32[1024,2560]{1,0} fusion(%a, %b), kind=kLoop, calls=%c, metadata={op_name="
         "\"jit(loss_fn)/transpose(jvp(Decoder))/while/body/closed_call/layers/mlp/jit(silu)\" stack_frame_id=297}"
         "\n  ROOT %ynn_fusion.185 = f32[2560,8192]{1,0} fusion(%d), kind=kCustom, metadata={op_name="
         "\"jit(grad_theirs)/jvp(jit(compute_per_token_logps))/einsum/BTD,DV->BTV/dot_general\"}"
         "\n  %add.1 = f32[] add(%e, %f)")
  ops = step_profile.hlo_ops(hlo)
  assert set(ops) == {"copy_bitcast_fusion.9", "ynn_fusion.185"}
  assert ops["copy_bitcast_fusion.9"][0] == "f32[1024,2560]{1,0}"
  assert step_profile.category("copy_bitcast_fusion.9", ops["copy_bitcast_fusion.9"][1]) == "bwd mlp elementwise/copy"
  assert step_profile.category("ynn_fusion.185", ops["ynn_fusion.185"][1]) == "fwd head"
  assert step_profile.category("ynn_fusion.3", "jit(grad_theirs)/jvp(x)/feed_forward/dot_general") == "fwd mlp matmul"
  assert step_profile.category("dot.7", "jit(loss_fn)/transpose(jvp(Decoder))/layers/self_attn/o_proj/transpose") \
      == "bwd attention matmul"
  assert step_profile.category("while.4", "jit(loss_fn)/transpose(jvp(Decoder))/while") == "loops"
  assert step_profile.category("wrapped_broadcast.6", "?") == "fwd other"
