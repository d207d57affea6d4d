"""trapo_jax against Google's Tunix (PyPI google-tunix 0.1.7) on identical shapes and weights.

  pip install -r benchmarks/requirements-peers.txt     # in a venv of its own: see that file
  python -m benchmarks.peers                        # every row of the table (CPU: ~10-20 minutes on 2 cores)
  python -m benchmarks.peers --quick                # every row at small shapes, 2 pairs: does it run, do they agree
  python -m benchmarks.peers --rows=sample_b16,train_b16 --repeats=3 --out=benchmarks/results_peers.json

Without Tunix the command prints one line saying how to install it and exits 0: Tunix is an optional benchmark
dependency, never one of the library or of CI's tests.

Both sides run the same random-init Qwen2 weights (trapo_jax's, `sampler_speed.PRESETS`, copied into Tunix's Qwen2
nnx model, tunix/models/qwen2/model.py) on the same token ids:
  sampling: trapo_jax's `Sampler.sample` against Tunix's vanilla `tunix.generate.sampler.Sampler.__call__` (its
    prompts given as text to a tokenizer that reads ids: `_IdTokenizer`), greedy, EOS disabled so every row generates
    exactly `new_tokens`; Tunix's KV cache is prompt + new tokens long, the least its sampler accepts, as trapo_jax's.
    The work is batch x new tokens; the figure tokens/s.
  forward+backward: the matched loss, the PPO-clipped policy gradient (clip 0.2, ratio 1: old log-probs the current
    ones without gradient, no KL, no entropy term) averaged over every response token: trapo_jax's
    `train.step.loss_fn` under `jax.jit(jax.value_and_grad(...))` against Tunix's `rl.algo_core.grpo_loss_fn`
    (GRPOConfig beta 0, epsilon 0.2, loss_agg_mode token-mean) under `nnx.jit(nnx.value_and_grad(...))`. Each
    returns its loss, its metrics and the gradient of every weight, as each trainer computes them before its
    optimizer update. Sequences are prompt + response tokens exactly (the trainer's packing would bucket 160 to 256;
    here both sides get 160). The figure is seconds per call.

Before timing, each row's first (compiling) call of either side is checked against the other: greedy token ids
equal (a row may part only at an argmax tie, both tokens' logits within --logit_tol), per-token log-probs, the loss
and every gradient within float32 tolerance. A row that differs is not timed: one line names what differs.
Then the sides alternate, ours then theirs, for --repeats pairs; the figures are each side's median and the median
and range of the per-pair ratios, ratio = trapo_jax speed / Tunix speed (Tunix's seconds over ours in that pair), so
that the machine's load, which moves from minute to minute, hits both sides of a pair alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
import time
import warnings
from typing import Callable, Sequence

import numpy as np

TUNIX_VERSION = "0.1.7"
INSTALL_LINE = ("benchmarks.peers: Tunix is not installed, nothing measured; to compare against it, in a venv of its "
                "own: pip install -r benchmarks/requirements-peers.txt (google-tunix==0.1.7; it conflicts with "
                "requirements.txt's safetensors and transformers pins)")
_NO_EOS = -1  # an id no sampler can draw: every row generates exactly new_tokens
# Tunix's pad id: one outside the vocabulary. Tunix masks a generated pad id from attention (its sampler's
# `_sample_step`: `token_buffer == pad_id`; `common.process_ids` in training) where trapo_jax attends to it as to any
# token the row generated, and the random-init model does generate id 0: with a real id both would compute different
# things. No prompt or completion here is padded, so the id pads nothing.
_PAD = -1


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: `kind` "sample" (batch prompts of prompt_len tokens, new_tokens generated each) or
  "train" (batch rows of prompt_len + new_tokens tokens, the last new_tokens of them the response)."""
  name: str
  kind: str
  batch: int
  prompt_len: int
  new_tokens: int
  repeats: int  # interleaved pairs by default

  @property
  def work(self) -> float:
    """What one run does: generated tokens (sampling), or one call (forward+backward)."""
    return float(self.batch * self.new_tokens) if self.kind == "sample" else 1.0

  def label(self) -> str:
    if self.kind == "sample":
      return f"sampling, batch {self.batch}, {self.prompt_len}-token prompts, {self.new_tokens} new tokens"
    return (f"forward+backward, {self.batch} rows x ({self.prompt_len}+{self.new_tokens}), PG clip 0.2 "
            f"token-mean")

  def quick(self) -> "Row":
    """The same row at small shapes and 2 pairs (--quick)."""
    return dataclasses.replace(self, batch=max(2, self.batch // 8), prompt_len=8, new_tokens=16, repeats=2)


# The issue-30 table: sampling at batch 16 and 64, forward+backward at 16 and 64 rows.
ROWS = {r.name: r for r in (Row("sample_b16", "sample", 16, 32, 128, 5), Row("sample_b64", "sample", 64, 32, 256, 3),
                            Row("train_b16", "train", 16, 32, 128, 5), Row("train_b64", "train", 64, 32, 128, 3))}


class Mismatch(Exception):
  """The two sides do not compute the same thing on a row: it is not timed. The message names what differs."""


def tunix_available() -> bool:
  try:
    import tunix  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


# -- the arithmetic of interleaved pairs ----------------------------------------------------------------------------
def pair_figures(ours: Sequence[float], theirs: Sequence[float], work: float) -> dict:
  """Seconds of interleaved runs (ours[i] ran just before theirs[i]) and one run's work -> the row's figures.

  Each side: median seconds and work / median seconds. Pair i's ratio is trapo_jax's speed over Tunix's in that
  pair, theirs[i] / ours[i]; the row's ratio is the median of the pairs' ratios (not the ratio of the medians), its
  range their minimum and maximum.
  """
  a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if a.ndim != 1 or a.shape != b.shape or not a.size:
    raise ValueError(f"pairs need as many runs of each side, at least one: {a.shape} and {b.shape}")
  if (a <= 0).any() or (b <= 0).any():
    raise ValueError("run times must be positive")
  ratios = b / a
  return {"pairs": int(a.size), "ours_s": float(np.median(a)), "theirs_s": float(np.median(b)),
          "ours_per_s": work / float(np.median(a)), "theirs_per_s": work / float(np.median(b)),
          "ratio": float(np.median(ratios)), "ratio_range": [float(ratios.min()), float(ratios.max())],
          "ours_runs_s": a.tolist(), "theirs_runs_s": b.tolist()}


def interleave(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[list, list]:
  """Seconds of `repeats` pairs of runs, ours then theirs in each."""
  a, b = [], []
  for _ in range(repeats):
    for run, out in ((ours, a), (theirs, b)):
      t = time.perf_counter()
      run()
      out.append(time.perf_counter() - t)
  return a, b


# -- the same weights on both sides ---------------------------------------------------------------------------------
def tunix_config(cfg):
  """trapo_jax's ModelConfig -> Tunix's Qwen2 ModelConfig with the same shapes; ValueError for what Tunix's Qwen2
  lacks."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from tunix.models.qwen2 import model as qwen2  # pylint: disable=import-outside-toplevel
  from trapo_jax.models import rope  # pylint: disable=import-outside-toplevel
  if cfg.model_type != "qwen2" or not cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling != rope.RopeScaling():
    raise ValueError("Tunix's Qwen2 is a Qwen2 with q/k/v bias, no q/k norm and plain RoPE: model_type, qkv_bias, "
                     "qk_norm or rope_scaling differs")
  return qwen2.ModelConfig(num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
                           hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                           num_kv_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.rms_norm_eps,
                           use_tied_embedding=cfg.tie_embeddings, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype))


def to_tunix(params, cfg) -> dict[tuple, np.ndarray]:
  """trapo_jax's parameter tree (or a gradient of the same structure) -> {Tunix Qwen2 parameter path: array}.

  Layouts: q/k/v kernels [D, H*Dh] -> [D, H, Dh], o_proj [H*Dh, D] -> [H, Dh, D], biases flat [H*Dh] as both keep
  them; norms' `scale` -> `w`; the MLP and the untied head unchanged ([D, F], [F, D], [D, V]).
  """
  p = params["params"] if "params" in params else params
  d, dh = cfg.hidden_size, cfg.head_dim
  out = {("embedder", "input_embedding"): p["embed"]["embedding"], ("final_norm", "w"): p["norm"]["scale"]}
  if not cfg.tie_embeddings:
    out[("lm_head", "w")] = p["lm_head"]["kernel"]
  for i in range(cfg.num_layers):
    lp = p["layers"] if cfg.scan_layers else p[f"layers_{i}"]
    at = (lambda x: x[i]) if cfg.scan_layers else (lambda x: x)
    a, m = lp["self_attn"], lp["mlp"]
    pre = ("layers", i)
    out[pre + ("attn", "q_proj", "w")] = at(a["q_proj"]["kernel"]).reshape(d, cfg.num_heads, dh)
    out[pre + ("attn", "k_proj", "w")] = at(a["k_proj"]["kernel"]).reshape(d, cfg.num_kv_heads, dh)
    out[pre + ("attn", "v_proj", "w")] = at(a["v_proj"]["kernel"]).reshape(d, cfg.num_kv_heads, dh)
    out[pre + ("attn", "o_proj", "w")] = at(a["o_proj"]["kernel"]).reshape(cfg.num_heads, dh, d)
    for name in ("q", "k", "v"):
      out[pre + ("attn", f"{name}_bias")] = at(a[f"{name}_proj"]["bias"])
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[pre + ("mlp", name, "kernel")] = at(m[name]["kernel"])
    out[pre + ("input_layernorm", "w")] = at(lp["input_layernorm"]["scale"])
    out[pre + ("post_attention_layernorm", "w")] = at(lp["post_attention_layernorm"]["scale"])
  return {k: np.asarray(v) for k, v in out.items()}


def _flat(state) -> dict[tuple, np.ndarray]:
  """An nnx State of parameters (or their gradients) -> {path: array}."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return {tuple(path): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
          for path, v in nnx.to_flat_state(state)}


def tunix_model(cfg, params):
  """Tunix's Qwen2 holding trapo_jax's `params`; ValueError naming a parameter either side lacks or misshapes."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from tunix.models.qwen2 import model as qwen2  # pylint: disable=import-outside-toplevel
  model = qwen2.Qwen2(tunix_config(cfg), rngs=nnx.Rngs(0))
  ours = to_tunix(params, cfg)
  theirs = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  if set(ours) != set(theirs):
    raise ValueError(f"parameters only in trapo_jax's copy: {sorted(set(ours) - set(theirs))}; only in Tunix's "
                     f"model: {sorted(set(theirs) - set(ours))}")
  for path, var in theirs.items():
    if var.get_value().shape != ours[path].shape:
      raise ValueError(f"{'/'.join(map(str, path))}: trapo_jax {ours[path].shape}, Tunix {var.get_value().shape}")
    var.set_value(jnp.asarray(ours[path], var.get_value().dtype))
  return model


class _IdTokenizer:
  """What Tunix's sampler reads text through, for token ids: "12 7 301" <-> [12, 7, 301]; no BOS, pad id _PAD (none
  of the vocabulary's)."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return _NO_EOS

  def pad_id(self) -> int:
    return _PAD


# -- sampling -------------------------------------------------------------------------------------------------------
def sample_prompts(cfg, row: Row) -> np.ndarray:
  """A sampling row's prompts [batch, prompt_len]: random ids of the vocabulary, the same in every run."""
  return np.random.default_rng(0).integers(1, cfg.vocab_size, (row.batch, row.prompt_len)).astype(np.int32)


def sample_runs(cfg, params, model, prompts: np.ndarray, new_tokens: int):
  """(ours, theirs): functions that run each sampler once on `prompts` [B, P] (greedy, exactly new_tokens each) and
  return the generated ids [B, new_tokens] on the host."""
  import jax  # pylint: disable=import-outside-toplevel
  from tunix.generate import sampler as tunix_sampler  # pylint: disable=import-outside-toplevel
  from trapo_jax.sampling import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  b, p = prompts.shape
  ours_sampler = sampler_lib.Sampler(cfg)
  lens = np.full((b,), p, np.int32)
  ours = lambda: np.asarray(ours_sampler.sample(params, prompts, lens, max_len=new_tokens, rng=jax.random.key(0),
                                                temperature=0.0).tokens)
  # The decode program `ours` runs, at the shapes and sampling parameters `Sampler.sample` derives for these rows
  # (benchmarks/step_profile.py reads its HLO).
  ours.lower = lambda: ours_sampler.lower(
      params, prompts=b, prompt_len=p, max_len=new_tokens, width=sampler_lib.bucket(p),
      budget=sampler_lib.decode_budget(new_tokens, 0), n=1, sp=sampler_lib.SamplingParams(0.0, 1.0, -1, (), 0))[1]
  cache = tunix_sampler.CacheConfig(cache_size=p + new_tokens, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
  theirs_sampler = tunix_sampler.Sampler(model, _IdTokenizer(), cache)
  texts = [_IdTokenizer().decode(row) for row in prompts]
  theirs = lambda: np.stack(theirs_sampler(texts, max_generation_steps=new_tokens, max_prompt_length=p,
                                           eos_tokens=[_NO_EOS], temperature=0.0).tokens)
  theirs.lower = None  # Tunix's sampler jits inside; its ops are profiled without names
  return ours, theirs


def check_greedy(cfg, params, prompts: np.ndarray, ours: np.ndarray, theirs: np.ndarray, logit_tol: float) -> dict:
  """Greedy ids [B, N] of both samplers -> {"rows_equal", "ties"}; Mismatch where a row parts other than at a tie.

  Where a row first differs, the two tokens' logits after the common prefix (trapo_jax's forward) must be within
  logit_tol: float32 rounding picked a different argmax of (nearly) equal logits, and the rest of the row is not
  comparable. Anything else is a Mismatch naming the row, the step and the gap.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from trapo_jax.models import transformer as tfm  # pylint: disable=import-outside-toplevel
  if ours.shape != theirs.shape:
    raise Mismatch(f"sampler: trapo_jax generated {ours.shape} ids, Tunix {theirs.shape}")
  ties = []
  for r in np.flatnonzero((ours != theirs).any(1)):
    j = int(np.argmax(ours[r] != theirs[r]))
    seq = np.concatenate([prompts[r], ours[r, :j]])[None].astype(np.int32)
    logits = np.asarray(tfm.forward_logits(params, cfg, jnp.asarray(seq), jnp.ones(seq.shape, bool)))[0, -1]
    gap = abs(float(logits[ours[r, j]] - logits[theirs[r, j]]))
    if gap > logit_tol:
      raise Mismatch(f"sampler: row {r} differs at generated token {j} (trapo_jax {ours[r, j]}, Tunix "
                     f"{theirs[r, j]}), logit gap {gap:.2e} > {logit_tol:.0e}: not an argmax tie")
    ties.append({"row": int(r), "step": j, "logit_gap": gap})
  return {"rows_equal": int(len(ours) - len(ties)), "ties": ties}


# -- forward+backward -----------------------------------------------------------------------------------------------
def train_batch(cfg, row: Row, seed: int = 0) -> dict:
  """Host arrays of one micro-batch: prompt [B, P] and completion [B, N] ids in 1 .. V-1, advantages [B]."""
  rng = np.random.default_rng(seed)
  return {"prompt": rng.integers(1, cfg.vocab_size, (row.batch, row.prompt_len)).astype(np.int32),
          "completion": rng.integers(1, cfg.vocab_size, (row.batch, row.new_tokens)).astype(np.int32),
          "advantages": rng.standard_normal(row.batch).astype(np.float32)}


def matched_objective():
  """trapo_jax's objective matched to Tunix's GRPO loss with beta 0, epsilon 0.2, token-mean: the clipped policy
  gradient on the model's own tokens, averaged over all response tokens."""
  from trapo_jax import losses  # pylint: disable=import-outside-toplevel
  return losses.Objective(terms=(losses.Term("pg", "own", "policy_gradient", aggregation="token_mean",
                                             params=(("clip_eps", 0.2),)),))


def train_runs(cfg, params, model, batch: dict, chunk_size: int = 1024):
  """(ours, theirs): functions computing (loss, gradients) once on `batch`, each as its trainer does (metrics too),
  the gradients as {Tunix path: host array}; and (ours_logp, theirs_logp) [B, N] host arrays for the check."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tunix.rl import algo_core, common  # pylint: disable=import-outside-toplevel
  from tunix.rl.grpo import grpo_learner  # pylint: disable=import-outside-toplevel
  from trapo_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  prompt, completion = jnp.asarray(batch["prompt"]), jnp.asarray(batch["completion"])
  adv = jnp.asarray(batch["advantages"])
  b, p = prompt.shape
  n = completion.shape[1]
  objective = matched_objective()
  weights = objective.weights_at(0)
  zeros = jnp.zeros((b, n), bool)
  mb = dict(seq_tokens=jnp.concatenate([prompt, completion], 1), seq_mask=jnp.ones((b, p + n), bool),
            resp_start=jnp.full((b,), p, jnp.int32), resp_tokens=completion, prefix_mask=zeros, off_loss_mask=zeros,
            response_mask=jnp.ones((b, n), bool), advantages=adv, rewards=jnp.zeros((b,), jnp.float32),
            kind=jnp.zeros((b,), jnp.int32))
  grad_ours = jax.jit(jax.value_and_grad(functools.partial(
      step_lib.loss_fn, model_cfg=cfg, objective=objective, chunk_size=chunk_size, old_logp="current"), has_aux=True))

  def ours():
    (loss, metrics), grads = jax.block_until_ready(grad_ours(params, mb, weights))
    return float(loss), grads, metrics

  ours.lower = lambda: grad_ours.lower(params, mb, weights)  # the program (benchmarks/step_profile.py reads its HLO)

  algo = grpo_learner.GRPOConfig(num_generations=2, beta=0.0, epsilon=0.2, loss_agg_mode="token-mean")
  algo.temperature = 1.0  # what grpo_learner sets from the rollout config
  example = grpo_learner.TrainExample(
      prompt_ids=prompt, prompt_mask=jnp.ones((b, p), jnp.int32), completion_ids=completion,
      completion_mask=jnp.ones((b, n), jnp.int32), advantages=adv, ref_per_token_logps=None,
      old_per_token_logps=None)

  @nnx.jit
  def grad_theirs(m, ex):
    loss_fn = lambda m: algo_core.grpo_loss_fn(m, ex, algo, _PAD, _NO_EOS)
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
    return loss, grads, aux

  def theirs():
    loss, grads, aux = jax.block_until_ready(grad_theirs(model, example))
    return float(loss), grads, aux

  theirs.lower = lambda: grad_theirs.lower(model, example)

  def logps():
    ours_logp = jax.jit(lambda prm: step_lib.response_logprobs(prm, cfg, mb, chunk_size)[0])(params)
    graphdef, state = nnx.split(model)
    theirs_logp = common.compute_per_token_logps(graphdef, state, prompt_tokens=prompt, completion_tokens=completion,
                                                 pad_id=_PAD, eos_id=_NO_EOS)
    return np.asarray(ours_logp), np.asarray(theirs_logp)

  return ours, theirs, logps


def check_train(cfg, ours_out, theirs_out, logps: tuple[np.ndarray, np.ndarray], rtol: float) -> dict:
  """Both sides' (loss, grads, metrics) and per-token log-probs -> the largest differences; Mismatch naming the
  first that is beyond float32 tolerance (each gradient leaf: max |a - b| <= rtol * max |b|)."""
  ours_loss, ours_grads, _ = ours_out
  theirs_loss, theirs_grads, _ = theirs_out
  lo, lt = logps
  logp_gap = float(np.abs(lo - lt).max())
  if logp_gap > rtol * max(1.0, float(np.abs(lt).max())):
    raise Mismatch(f"forward: per-token log-probs differ by up to {logp_gap:.2e}")
  if abs(ours_loss - theirs_loss) > rtol * max(1.0, abs(theirs_loss)):
    raise Mismatch(f"loss: trapo_jax {ours_loss:.7g}, Tunix {theirs_loss:.7g}")
  ga, gb = to_tunix(ours_grads, cfg), _flat(theirs_grads)
  if set(ga) != set(gb):
    raise Mismatch(f"gradients: parameters differ: {sorted(set(ga) ^ set(gb))}")
  worst = 0.0
  for path in sorted(ga, key=str):
    scale = float(np.abs(gb[path]).max())
    err = float(np.abs(ga[path] - gb[path]).max())
    if err > rtol * scale + 1e-12:
      raise Mismatch(f"gradient of {'/'.join(map(str, path))}: max |trapo_jax - Tunix| {err:.2e}, "
                     f"{err / max(scale, 1e-30):.1e} of its largest entry (> {rtol:.0e})")
    worst = max(worst, err / max(scale, 1e-30))
  return {"logp_max_abs": logp_gap, "loss": theirs_loss, "grad_max_rel": worst}


# -- the rows -------------------------------------------------------------------------------------------------------
def measure_row(cfg, params, model, row: Row, repeats: int, logit_tol: float, rtol: float) -> dict:
  """Check, then time one row -> its figures (pair_figures + the check's), or {"error": ...} on a Mismatch."""
  out = {"row": row.name, "label": row.label(), **dataclasses.asdict(row), "repeats": repeats}
  try:
    if row.kind == "sample":
      prompts = sample_prompts(cfg, row)
      ours, theirs = sample_runs(cfg, params, model, prompts, row.new_tokens)
      out["check"] = check_greedy(cfg, params, prompts, ours(), theirs(), logit_tol)
    else:
      ours, theirs, logps = train_runs(cfg, params, model, train_batch(cfg, row))
      out["check"] = check_train(cfg, ours(), theirs(), logps(), rtol)
  except Mismatch as err:
    out["error"] = str(err)
    return out
  out.update(pair_figures(*interleave(ours, theirs, repeats), row.work))
  return out


def measure(rows: Sequence[Row], *, preset: str = "tiny10m", dtype: str = "float32", repeats: int | None = None,
            logit_tol: float | None = None, rtol: float | None = None, log=print) -> dict:
  """Every row of `rows` on one model -> {"model", "rows": [...], machine and load}. Requires Tunix."""
  import jax  # pylint: disable=import-outside-toplevel
  import tunix  # pylint: disable=import-outside-toplevel,unused-import
  from benchmarks import sampler_speed  # pylint: disable=import-outside-toplevel
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings("ignore", category=DeprecationWarning)  # Tunix's own, at every trace
  cpu = jax.default_backend() == "cpu"
  # float32 on a GPU or TPU multiplies in reduced precision unless asked: wider tolerances there.
  logit_tol = logit_tol if logit_tol is not None else (1e-4 if cpu else 2e-2)
  rtol = rtol if rtol is not None else (2e-3 if cpu else 5e-2)
  cfg, params = sampler_speed.model(preset, dtype)
  model = tunix_model(cfg, params)
  result = {"date": time.strftime("%Y-%m-%d"), "tunix": importlib.metadata.version("google-tunix"),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_before": list(os.getloadavg()),
            "model": {"preset": preset, "dtype": dtype, "params_m": cfg.num_params / 1e6,
                      **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                      "num_heads", "num_kv_heads", "head_dim", "tie_embeddings")}},
            "logit_tol": logit_tol, "rtol": rtol, "rows": []}
  for row in rows:
    log(f"{row.name}: {row.label()} ...")
    r = measure_row(cfg, params, model, row, repeats or row.repeats, logit_tol, rtol)
    log(f"  {r['error']}" if "error" in r else f"  {_ratio_text(r)}")
    result["rows"].append(r)
  result["load_after"] = list(os.getloadavg())
  return result


def _ratio_text(r: dict) -> str:
  lo, hi = r["ratio_range"]
  return f"**{r['ratio']:.2f}x** (median of {r['pairs']} pairs; {lo:.2f}-{hi:.2f})"


def _speed(r: dict, side: str) -> str:
  return f"{r[f'{side}_per_s']:.0f} tok/s" if r["kind"] == "sample" else f"{r[f'{side}_s']:.2f} s"


def table(result: dict) -> str:
  """The rows as the Markdown table of docs/performance.md's "Against Tunix"."""
  lines = [f"| work | trapo_jax | Tunix {result['tunix']} | ratio (trapo_jax speed / Tunix) |", "|---|---|---|---|"]
  for r in result["rows"]:
    if "error" in r:
      lines.append(f"| {r['label']} | not timed: {r['error']} | | |")
      continue
    lines.append(f"| {r['label']} | {_speed(r, 'ours')} | {_speed(r, 'theirs')} | {_ratio_text(r)} |")
  return "\n".join(lines) + "\n"


def header(result: dict) -> str:
  m = result["model"]
  checks = []
  for r in result["rows"]:
    c = r.get("check")
    if c and r["kind"] == "sample":
      checks.append(f"{r['row']}: {c['rows_equal']}/{r['batch']} rows equal" +
                    (f", {len(c['ties'])} parted at an argmax tie" if c["ties"] else ""))
    elif c:
      checks.append(f"{r['row']}: log-probs within {c['logp_max_abs']:.0e}, gradients within "
                    f"{c['grad_max_rel']:.0e} of each leaf's largest entry")
  return (f"{m['preset']} ({m['params_m']:.1f}M params: vocab {m['vocab_size']}, hidden {m['hidden_size']}, "
          f"{m['num_layers']} layers, {m['num_heads']} heads / {m['num_kv_heads']} KV), {m['dtype']}, "
          f"backend {result['backend']}, {result['machine']}, {result['cpu_count']} CPU cores, jax {result['jax']}, "
          f"tunix {result['tunix']}; load average {result['load_before'][0]:.1f} before, "
          f"{result['load_after'][0]:.1f} after.\nChecked before timing: " + "; ".join(checks) + ".\n")


def main(argv) -> int:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not tunix_available():
    print(INSTALL_LINE)
    return 0
  unknown = [n for n in f.rows if n not in ROWS]
  if unknown:
    raise SystemExit(f"--rows: unknown {unknown} (known: {', '.join(ROWS)})")
  rows = [ROWS[n].quick() if f.quick else ROWS[n] for n in f.rows]
  result = measure(rows, preset=f.preset, dtype=f.dtype, repeats=f.repeats or None, logit_tol=f.logit_tol,
                   rtol=f.rtol)
  result["command"] = "python -m benchmarks.peers " + " ".join(sys.argv[1:])
  print("\n" + header(result) + "\n" + table(result))
  if f.out:
    with open(f.out, "w") as fh:
      json.dump(result, fh, indent=2)
    print(f"wrote {f.out}")
  return 0


def define_flags():
  """Command-line flags, defined only when run as a script: benchmarks.run imports this module."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from benchmarks import sampler_speed  # pylint: disable=import-outside-toplevel
  flags.DEFINE_list("rows", list(ROWS), f"Rows of the table to run ({', '.join(ROWS)}).")
  flags.DEFINE_bool("quick", False, "Every row at small shapes (batch / 8, 8-token prompts, 16 new tokens), 2 pairs.")
  flags.DEFINE_integer("repeats", 0, "Interleaved pairs per row (0: the row's default, or 2 with --quick).")
  flags.DEFINE_enum("preset", "tiny10m", list(sampler_speed.PRESETS), "Model shapes (random-init weights).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
  flags.DEFINE_float("logit_tol", None, "Greedy check: the largest logit gap of an accepted argmax tie "
                     "(default 1e-4 on CPU, 2e-2 elsewhere).")
  flags.DEFINE_float("rtol", None, "Train check: gradient tolerance relative to each leaf's largest entry "
                     "(default 2e-3 on CPU, 5e-2 elsewhere).")
  flags.DEFINE_string("out", None, "Also write the figures as JSON here.")


if __name__ == "__main__":
  if not tunix_available():  # before jax or absl: one line, exit 0
    print(INSTALL_LINE)
    sys.exit(0)
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
