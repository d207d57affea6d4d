"""Training state, the optimizer, and building the policy (random, or from a Hugging Face directory) on a mesh."""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trapo_jax import config as config_lib
from trapo_jax import sharding
from trapo_jax.errors import ConfigError
from trapo_jax.models import hf
from trapo_jax.models import transformer as tfm


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken (skipped non-finite updates included)
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw key: the run's base key; per-step keys are folded in from `step`

  @classmethod
  def shardings(cls, model_cfg: tfm.ModelConfig, mesh, tx: optax.GradientTransformation,
                rules=sharding.DEFAULT_RULES) -> "TrainState":
    """The state's NamedShardings, stated once: params by their logical axes, optimizer moments like their params,
    counts, the step and the key replicated. Init, restore (through the initialised template), the jitted step and
    --mode=compile all place the state with these."""
    params = param_shardings(model_cfg, mesh, rules)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, _abstract_params(model_cfg)),
                                      params, transform_non_params=lambda _: rep)
    return cls(step=rep, params=params, opt_state=opt_state, rng=rep)

  @classmethod
  def abstract(cls, model_cfg: tfm.ModelConfig, mesh, tx: optax.GradientTransformation) -> "TrainState":
    """The state as shapes with its shardings (jax.ShapeDtypeStruct leaves): what --mode=compile lowers for."""
    params = _abstract_params(model_cfg)
    shapes = cls(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params),
                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        cls.shardings(model_cfg, mesh, tx))


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; the learning rate of `learning_rate` at each update: constant after an
  optional linear warm-up (official RL: none), or OpenRLHF's cosine to min_lr_ratio x lr over decay_steps (the
  `schedule`, `min_lr_ratio` and `decay_steps` keys a method's own optimizer adds: schedules.LR_SCHEDULES)."""
  lr = optim_cfg.lr
  if optim_cfg.get("schedule", "constant") != "constant":
    lr = functools.partial(_scheduled_lr, optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.decay_steps,
                           optim_cfg.min_lr_ratio)
  elif optim_cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps)
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay))


def slot(txs: tuple[optax.GradientTransformation, ...], index: int) -> optax.GradientTransformation:
  """Several optimizers of the same params in one state (a tuple of theirs): `update` applies txs[index] and leaves
  the others' state as it is. A method's second optimizer (ReLIFT's fine-tuning AdamW) is checkpointed with the run's.
  """
  def init(params):
    return tuple(tx.init(params) for tx in txs)

  def update(updates, state, params=None):
    updates, new = txs[index].update(updates, state[index], params)
    return updates, state[:index] + (new,) + state[index + 1:]

  return optax.GradientTransformation(init, update)


def _scheduled_lr(lr: float, warmup: int, total: int, min_ratio: float, count: jax.Array) -> jax.Array:
  """`schedules.cosine_with_min_lr` x lr at update `count` (in graph): linear warm-up from 0, then the cosine from
  lr to min_ratio x lr over the updates up to `total`."""
  count = jnp.asarray(count, jnp.float32)
  progress = (count - warmup) / max(1, total - warmup)
  decay = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return lr * jnp.where(count < warmup, count / max(1, warmup), jnp.maximum(0.0, decay))


def learning_rate(optim_cfg, step: int) -> float:
  """The learning rate of update `step` (0-based): what `make_optimizer`'s AdamW applies, for the metrics."""
  if optim_cfg.get("schedule", "constant") == "cosine_with_min_lr":
    from trapo_jax.algorithms import schedules
    return optim_cfg.lr * schedules.cosine_with_min_lr(step, optim_cfg.warmup_steps, optim_cfg.decay_steps,
                                                       optim_cfg.min_lr_ratio)
  if optim_cfg.warmup_steps > 0:
    return optim_cfg.lr * min(1.0, step / optim_cfg.warmup_steps)
  return optim_cfg.lr


# The config keys that may override a checkpoint's config.json, and the official 7B run's values for them.
CHECKPOINT_OVERRIDES = ("rope_theta", "max_position_embeddings")
# What config.json decides when model.hf_dir is set; the rest of the model group is compute options or the overrides.
CHECKPOINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                   "num_kv_heads", "head_dim", "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings")
OFFICIAL_16K = dict(rope_theta=40000, max_position_embeddings=16384)


def model_config(cfg) -> tfm.ModelConfig:
  """The policy's ModelConfig: from `model.hf_dir` when set (compute options from the config; a non-zero
  model.rope_theta or model.max_position_embeddings overrides config.json's), else the sizes.

  Raises ConfigError when the model has fewer positions than a sequence of the run (`check_positions`).
  """
  m = cfg.model
  if m.hf_dir:
    overrides = {k: m[k] for k in CHECKPOINT_OVERRIDES if m[k]}
    model_cfg = hf.config_from_hf(m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                  scan_layers=m.scan_layers, **overrides)
    source = f"{m.hf_dir}/config.json" + (" with the overrides" if overrides else "")
    ignored = ignored_sizes(m, model_cfg)
    if ignored:
      logging.warning("%s/config.json describes the model; the config's %s are not used", m.hf_dir, ", ".join(ignored))
  else:
    model_cfg, source = tfm.ModelConfig.from_config(m), "the config"
  check_positions(cfg, model_cfg, source)
  return model_cfg


def ignored_sizes(m, model_cfg: tfm.ModelConfig) -> list[str]:
  """The model keys a config set (away from the base config's) that the checkpoint's config.json contradicts.

  With hf_dir the checkpoint's sizes win, so such a key has no effect; saying so catches a config written for
  another model (a 7B config run on a 1.5B checkpoint) and a size flag that was expected to change the model.
  """
  default = config_lib.base_config().model
  return [f"model.{k}={m[k]!r} (config.json: {getattr(model_cfg, k)!r})" for k in CHECKPOINT_KEYS
          if m[k] != default[k] and m[k] != getattr(model_cfg, k)]


def check_positions(cfg, model_cfg: tfm.ModelConfig, source: str = "the model") -> None:
  """ConfigError unless the model's positions hold a prompt and a response of the run (prompt + response tokens).

  A stock Qwen2.5-Math-7B declares 4096 positions with RoPE base 10000; the official run's 1024 + 8192 tokens need
  the 16k setting (16384 positions, base 40000) that the LUFFY/HPT/ReLIFT scripts give that checkpoint.
  """
  d = cfg.data
  need = d.max_prompt_len + d.max_response_len
  if model_cfg.max_position_embeddings >= need:
    return
  if need <= OFFICIAL_16K["max_position_embeddings"]:
    fix = " ".join(f"--config.model.{k}={v}" for k, v in OFFICIAL_16K.items()) + " (the official 7B run's)"
  else:
    fix = (f"--config.model.max_position_embeddings={1 << (need - 1).bit_length()} and a larger "
           "--config.model.rope_theta")
  raise ConfigError(f"model.max_position_embeddings: {source} declares {model_cfg.max_position_embeddings} "
                    f"positions, a sequence here has {d.max_prompt_len} + {d.max_response_len} = {need} tokens: "
                    f"add {fix}, or shorten data.max_response_len")


def tokenizer_dir(cfg) -> str:
  return cfg.model.tokenizer_dir or cfg.model.hf_dir


def param_shardings(model_cfg: tfm.ModelConfig, mesh, rules=sharding.DEFAULT_RULES):
  return sharding.logical_shardings(tfm.abstract_params(model_cfg), mesh, rules)


def _abstract_params(model_cfg: tfm.ModelConfig) -> Any:
  return nn.unbox(tfm.abstract_params(model_cfg))


def init_params(cfg, model_cfg: tfm.ModelConfig, mesh) -> Any:
  """Params placed on the mesh: loaded from `model.hf_dir`, or random (seeded by `cfg.seed`)."""
  shardings = param_shardings(model_cfg, mesh)
  if cfg.model.hf_dir:
    _, host = hf.load_hf(cfg.model.hf_dir, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                         remat=model_cfg.remat, scan_layers=model_cfg.scan_layers)
    return sharding.put_global(host, shardings)
  with sharding.activate(mesh):
    return jax.jit(lambda k: nn.unbox(tfm.init_params(model_cfg, k)), out_shardings=shardings)(
        jax.random.key(cfg.seed))


def init_state(cfg, model_cfg: tfm.ModelConfig, mesh, tx: optax.GradientTransformation) -> TrainState:
  shardings = TrainState.shardings(model_cfg, mesh, tx)
  params = init_params(cfg, model_cfg, mesh)
  opt_state = jax.jit(tx.init, in_shardings=(shardings.params,), out_shardings=shardings.opt_state)(params)
  # Scalars live replicated on the mesh like everything else, so a restored state lands where a fresh one does.
  step, rng = jax.device_put((jnp.zeros((), jnp.int32), jax.random.PRNGKey(cfg.seed)),
                             (shardings.step, shardings.rng))
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def abstract_state(state: TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

