"""What several test modules share: a tiny config and its command line, fakes of the rollout's sampler and
grader, and the independent float64 references of the per-token losses and their aggregation."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import losses
from trapo_jax import paths
from trapo_jax.data import synthetic
from trapo_jax.sampling import rollout
from trapo_jax.train import checkpoint as ckpt_lib
from trapo_jax.train import state as state_lib
from trapo_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "trapo_layout.jsonl")


def cpu_env(devices: int = 8) -> dict[str, str]:
  """The environment of a process a test starts: JAX on the CPU with `devices` devices, this session's other XLA
  flags (tests/conftest.py), and no torch (tests/without_torch/sitecustomize.py), as a run installed from
  requirements.txt has none."""
  count = "--xla_force_host_platform_device_count"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
  path = os.pathsep.join(p for p in (os.path.join(ROOT, "tests", "without_torch"), os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([f"{count}={devices}", *flags]), PYTHONPATH=path)


def rerun_with_fusion_emitters(test_file: str, name: str) -> bool:
  """If this session compiles with XLA:CPU's elemental emitters (tests/conftest.py), runs the test `name` of
  `test_file` again in a child pytest under the default fusion emitters, failing here if it fails there, and returns
  True; False if the session already compiles with the fusion emitters (the caller then makes its checks itself).

  For a test that holds two different programs to the same bits: the elemental emitters round a fused loop by what
  it is fused with, so the same gradient in two programs may differ in its last bit (XLA's choice, not the code's)."""
  flag = "--xla_cpu_use_fusion_emitters="
  if f"{flag}false" not in os.environ.get("XLA_FLAGS", "").split():
    return False
  env = cpu_env(8)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(f"{flag}false", f"{flag}true")
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        f"{os.path.relpath(test_file, ROOT)}::{name}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]
  return True


ENV = cpu_env(8)
# The command line equivalent of `tiny(default config)`: same identity, same mesh (so compiled programs are shared).
TINY_FLAGS = [
    "--config.model.hf_dir=", f"--config.model.tokenizer_dir={synthetic.TOKENIZER_DIR}",
    "--config.model.vocab_size=384", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16", "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.data.source=demos",
    f"--config.data.path={FIXTURE}", "--config.data.max_prompt_len=128", "--config.data.max_response_len=24",
    "--config.data.levels=()", "--config.train.batch_prompts=2", "--config.train.ckpt_every=1",
    "--config.train.micro_batch_tokens=256", "--config.train.logprob_chunk=8", "--config.optim.lr=0.01",
    "--config.eval.at_start=False", "--config.eval.at_end=False", "--config.rollout.one_pass=True"]


def tiny(cfg, workdir: str, steps: int = 3):
  """A config shrunk to a random 1-layer model on the demonstration fixture, a few seconds a step."""
  with cfg.unlocked():
    cfg.mesh.update(data=1, fsdp=4, tensor=2)
    cfg.model.hf_dir = ""
    cfg.model.tokenizer_dir = synthetic.TOKENIZER_DIR
    cfg.model.update(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=16, dtype="float32", param_dtype="float32", remat="none")
    cfg.data.update(source="demos", path=FIXTURE, max_prompt_len=128, max_response_len=24, levels=(),
                    data_dir=os.path.join(workdir, "tfds"))
    cfg.train.update(steps=steps, batch_prompts=2, ckpt_every=1, micro_batch_tokens=256, logprob_chunk=8)
    if cfg.algo == "sft_then_rl":
      cfg.sft_then_rl.sft_steps = 1
      cfg.sft_then_rl.rl_prompts = 0.0  # the fixture's 6 problems do not split into two parts of a batch each
    # Every phase's rows must split over the 4 batch shards: 2 prompts do unless a phase has 1 row per prompt.
    if any(p.rows_per_prompt % 2 for p in algorithms.from_config(cfg).phases(cfg)):
      cfg.train.batch_prompts = 4
    cfg.optim.lr = 1e-2
    cfg.eval.update(at_start=False, at_end=False, every=0, grader_timeout_s=5.0)
    # A step's stages sampled in one decode pass, as GPU and TPU runs sample them (rollouts.one_pass_default): a
    # cold 3-step TRAPO run compiles 2 sampler programs a shape instead of a prefill and a decode per stage (17.8 s
    # against 27.5). The stages one after the other are the reference tests/test_one_pass.py holds one pass to, and
    # the default experiment runs them end to end on CPU (tests/test_eval.py).
    cfg.rollout.one_pass = True
  config_lib.validate(cfg, num_devices=jax.device_count())
  return cfg


def config_of(name: str = "default"):
  """experiments/configs/<name>.py's config, or for a registered method without one the default experiment with
  algo=<name> (as `--config.algo=<name>` sets it)."""
  if os.path.exists(os.path.join(ROOT, "experiments", "configs", f"{name}.py")):
    return importlib.import_module(f"experiments.configs.{name}").get_config()
  if name not in algorithms.names():
    raise ValueError(f"{name!r} is neither a config in experiments/configs/ nor a registered method")
  cfg = importlib.import_module("experiments.configs.default").get_config()
  cfg.algo = name
  return cfg


def restored_state(workdir: str, cfg):
  """(TrainState on the host, meta) of the workdir's newest checkpoint, restored as `cfg`'s run would."""
  ctx = trainer.build_context(cfg, workdir)
  template = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  ck = ckpt_lib.Checkpointer(workdir, keep=10, every=1)
  state, meta = ck.restore(template)
  ck.close()
  return jax.device_get(state), meta


def newest_checkpoint(workdir: str) -> int | None:
  """The newest *committed* checkpoint step of a workdir (local or gs://), as a restarted run sees it. On GCS a step's
  directory appears when its save starts and counts once orbax writes its commit file, so a directory listing is not
  enough to know what a resumed run will restore."""
  if not paths.exists(paths.join(workdir, "checkpoints")):
    return None
  ck = ckpt_lib.Checkpointer(workdir, keep=10, every=1, create=False)
  try:
    return ck.latest_step()
  finally:
    ck.close()


# ----------------------------------------------------------------------------------------------------------------
# Fakes of the rollout's sampler and grader, on a demonstration of 16 tokens.

SPLIT = 99  # the "\n\n" token id of these tests
L = 40
DEMO0 = [10, 11, 12, SPLIT, 13, 14, 15, SPLIT, 16, 17, 18, SPLIT, 19, 20, 21, 2]  # 16 tokens, EOS = 2
DEMO1 = [30, 31, SPLIT, 32, 33, 2]


@dataclasses.dataclass
class FakeBatch:
  prompt_ids: np.ndarray
  prompt_lens: np.ndarray
  demo_ids: np.ndarray
  demo_lens: np.ndarray
  answers: list


def fake_batch(g: int) -> FakeBatch:
  demo = np.zeros((g, 2, 16), np.int32)
  demo[:, 0, :16] = DEMO0
  demo[:, 1, :6] = DEMO1
  return FakeBatch(prompt_ids=np.full((g, 4), 5, np.int32), prompt_lens=np.full((g,), 4, np.int32),
                   demo_ids=demo, demo_lens=np.tile([[16, 6]], (g, 1)).astype(np.int32), answers=list("abcd")[:g])


def fake_sampler(calls):
  """Continuation = prefix followed by three tokens 50, 51, 2 (EOS); inactive rows are their prefix."""
  def sample_fn(prompt_ids, prompt_lens, prefix_ids, prefix_lens, active, n, row_ids):
    calls.append(dict(prefix_lens=prefix_lens.copy(), active=active.copy(), n=n, row_ids=row_ids.copy()))
    g = prompt_ids.shape[0]
    tokens = np.zeros((g * n, L), np.int32)
    prefix = np.zeros((g * n, L), bool)
    resp = np.zeros((g * n, L), bool)
    for i in range(g):
      k = int(prefix_lens[i])
      for j in range(n):
        r = i * n + j
        tokens[r, :k] = prefix_ids[i, :k]
        cont = [] if not active[i] else [50, 51, 2]
        tokens[r, k:k + len(cont)] = cont
        prefix[r, :k] = True
        resp[r, :k + len(cont)] = True
    return tokens, prefix, resp
  return sample_fn


def scripted_grader(script):
  """script[prompt][stage] = rewards of that stage's samples."""
  stage = [0]

  def grade_fn(tokens, response_mask, answers):
    g = len(script)
    n = len(answers) // g
    out = np.concatenate([np.asarray(script[i][stage[0]], np.float32) for i in range(g)])
    assert out.shape == (g * n,)
    stage[0] += 1
    return out
  return grade_fn


def random_token_inputs(rb: rollout.RolloutBatch, seed: int) -> losses.TokenInputs:
  """The loss's inputs for a rollout's rows: random log-probs, entropies and advantages [B] of `seed`."""
  rng = np.random.default_rng(seed)
  shape = rb.tokens.shape
  logp = rng.uniform(-5.0, -0.01, shape).astype(np.float32)
  # The sampler's and the reference's log-probs: the current ones moved by up to 1 (some importance ratios > 2).
  sampler = np.where(rb.response_mask & ~rb.prefix_mask, logp + rng.uniform(-1.0, 1.0, shape), 0.0)
  return losses.TokenInputs(
      logp=jnp.asarray(logp), old_logp=jnp.asarray(logp), entropy=jnp.asarray(rng.uniform(0, 3, shape), jnp.float32),
      advantages=jnp.asarray(rng.normal(size=shape[0]), jnp.float32), rewards=jnp.asarray(rb.rewards),
      kind=jnp.asarray(rb.kind), prefix_mask=jnp.asarray(rb.prefix_mask), off_loss_mask=jnp.asarray(rb.off_loss_mask),
      response_mask=jnp.asarray(rb.response_mask), sampler_logp=jnp.asarray(sampler, jnp.float32),
      ref_logp=jnp.asarray(logp + rng.uniform(-1.0, 1.0, shape), jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# An independent float64 reference of every selector, per-token loss and aggregation: value and d/dlogp.

def np_selected(name: str, x: dict) -> np.ndarray:
  resp, prefix, off = x["response_mask"], x["prefix_mask"] & x["response_mask"], x["off_loss_mask"]
  return {"own": resp & ~prefix, "imitated": prefix & off, "response": resp,
          "demo_rows": resp & (x["kind"] == losses.ROW_DEMO)[:, None]}[name]


def np_loss(name: str, x: dict, params: dict) -> tuple[np.ndarray, np.ndarray]:
  """(per-token value, its derivative w.r.t. logp) [B, T]."""
  logp = x["logp"]
  p, a = np.exp(logp), x["advantages"][:, None]
  if name == "policy_gradient":
    return np_policy_gradient(x, a, **params)
  if name == "reference_kl":  # log r = log pi_ref - log pi; d/dlogp of k1, k2, k3: 1, -log r, 1 - r
    log_r = x["ref_logp"] - logp
    if params["estimator"] == "k3_clamped":  # verl's low_var_kl: k3 clamped to [-10, 10], no gradient outside
      k3 = np.exp(log_r) - 1 - log_r
      return np.clip(k3, -10, 10), np.where(np.abs(k3) < 10, 1 - np.exp(log_r), 0.0)
    return {"k1": (-log_r, np.ones_like(logp)), "k2": (0.5 * log_r ** 2, -log_r),
            "k3": (np.exp(log_r) - 1 - log_r, 1 - np.exp(log_r))}[params["estimator"]]
  if name == "trsft":  # -p / sg(max(p, alpha))
    scale = np.maximum(p, params["alpha"])
    return -p / scale, -p / scale
  if name == "nll":
    return -logp, -np.ones_like(logp)
  if name == "luffy_shaped":
    g = params["gamma"]
    return -a * p / (p + g), -a * g * p / (p + g) ** 2
  if name == "entropy":  # an input of the loss, not a function of logp here
    return x["entropy"], np.zeros_like(logp)
  if name == "prefix_rft_surrogate":  # the advantage (the prefix's, if apart) survives on the imitated tokens of
    keep = np_top_share(x["entropy"], np_selected("imitated", x), params["entropy_drop"])  # highest entropy
    prefix_a = x.get("prefix_advantages")
    if prefix_a is not None and np.ndim(prefix_a) == 1:  # fields left None arrive as 0-d object arrays
      a = prefix_a[:, None]
    return np_policy_gradient(x, a * keep, clip_eps=params["clip_eps"], dual_clip=params["dual_clip"])
  if name == "phi_nll":  # -log p sg(p (1 - p))
    return -logp * p * (1 - p), -p * (1 - p)
  h = np_row_entropy(x)
  if name == "entropy_weighted_nll":  # -sg(exp(-H)) log p
    return -np.exp(-h) * logp, -np.exp(-h) * np.ones_like(logp)
  if name == "srft_reinforce":  # -w log p, w = correct sg(exp(H)) on a correct row, `wrong` otherwise
    w = np.where((x["rewards"] == 1)[:, None], params["correct"] * np.exp(h), params["wrong"])
    return -w * logp, -w * np.ones_like(logp)
  raise KeyError(f"no reference for per-token loss {name!r}: add one with the loss")


def np_policy_gradient(x: dict, a: np.ndarray, clip_eps=None, clip_eps_high=None, dual_clip=None, ratio="token",
                        tis_cap=None, tis_level="token", tis_mode="truncate") -> tuple[np.ndarray, np.ndarray]:
  """-A r with PPO's clip (clip-higher), dual-clip, GSPO's sequence ratio and the sampler importance weight."""
  own = x["response_mask"] & ~(x["prefix_mask"] & x["response_mask"])
  log_r = x["logp"] - x["old_logp"]  # old_logp carries no gradient
  if ratio == "sequence":  # GSPO: one ratio per row, exp of the mean log-ratio over its own tokens
    mean = np.where(own, log_r, 0.0).sum(-1, keepdims=True) / np.maximum(own.sum(-1, keepdims=True), 1)
    log_r = np.broadcast_to(mean, log_r.shape)
  r = np.exp(log_r)
  value, live = -a * r, np.ones(r.shape, bool)
  if clip_eps is not None:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -a * np.clip(r, 1 - clip_eps, 1 + high)
    live = (value >= clipped) | ((r > 1 - clip_eps) & (r < 1 + high))
    value = np.maximum(value, clipped)
  if dual_clip is not None:
    capped = (a < 0) & (value > -a * dual_clip)
    value, live = np.where(capped, -a * dual_clip, value), live & ~capped
  # d/dlogp_t: per token, of its own ratio; for GSPO-token, of the sequence ratio's value times exp(logp_t - sg).
  grad = np.where(live, -a * r, 0.0)
  if tis_cap is not None:
    log_rho = np.where(own, x["old_logp"] - x["sampler_logp"], 0.0)
    if tis_level == "sequence":
      log_rho = log_rho.sum(-1, keepdims=True)
    rho = np.exp(log_rho)
    w = np.minimum(rho, tis_cap) if tis_mode == "truncate" else np.where(rho <= tis_cap, rho, 0.0)
    value, grad = value * w, grad * w
  return value, grad


def np_row_entropy(x: dict) -> np.ndarray:
  """[B, 1]: each row's mean entropy over its response tokens."""
  m = x["response_mask"].astype(np.float64)
  return ((x["entropy"] * m).sum(-1) / np.maximum(m.sum(-1), 1.0))[:, None]


def np_top_share(values: np.ndarray, selected: np.ndarray, drop_share: float) -> np.ndarray:
  """The selected entries left after dropping the int(K * drop_share) of lowest value (K selected)."""
  idx = np.flatnonzero(selected)
  dropped = idx[np.argsort(values.reshape(-1)[idx], kind="stable")[:int(len(idx) * drop_share)]]
  keep = selected.reshape(-1).copy()
  keep[dropped] = False
  return keep.reshape(selected.shape)


def np_aggregate_weights(mask: np.ndarray, mode: str, max_len: int) -> np.ndarray:
  """The aggregation is linear: aggregate(v) = sum(weights * v); these are the weights [B, T]."""
  m = mask.astype(np.float64)
  if mode == "seq_sum_over_max_len":
    return m / (max_len * m.shape[0])
  if mode in ("token_mean", "global_token_mean"):  # one micro-batch: the batch's token count is its own
    return m / max(m.sum(), 1.0)
  if mode == "seq_mean_token_mean":
    tokens = m.sum(-1, keepdims=True)
    return m / np.maximum(tokens, 1.0) / max((tokens > 0).sum(), 1)
  if mode == "row_share_token_mean":  # token mean x the share of rows that have tokens
    return m / max(m.sum(), 1.0) * (m.sum(-1) > 0).sum() / m.shape[0]
  raise KeyError(mode)


def np_objective(objective: losses.Objective, x: dict, step: int) -> tuple[float, np.ndarray]:
  value, grad = 0.0, np.zeros_like(x["logp"])
  for term in objective.terms:
    selected = np_selected(term.tokens, x)
    v, dv = np_loss(term.loss, x, {**dict(term.params), **term.inputs_at(step)})  # scheduled inputs at `step`
    over = x["response_mask"] if term.over == "response" else selected
    w = np_aggregate_weights(over, term.aggregation, objective.max_len)
    scale = objective.seq_scale if term.aggregation == "seq_sum_over_max_len" else 1.0
    coef = term.weight_at(step) * scale
    value += coef * float(np.sum(w * np.where(selected, v, 0.0)))
    grad += coef * w * np.where(selected, dv, 0.0)
  return value, grad
