"""Training state, the optimizer, and building the policy (random, or from a Hugging Face directory) on a mesh."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trapo_jax import sharding
from trapo_jax.models import hf
from trapo_jax.models import transformer as tfm


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps taken (skipped non-finite updates included)
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw key: the run's base key; per-step keys are folded in from `step`


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; constant LR after an optional linear warm-up (official: none)."""
  lr = optim_cfg.lr
  if optim_cfg.warmup_steps > 0:
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


def learning_rate(optim_cfg, step: int) -> float:
  if optim_cfg.warmup_steps > 0:
    return optim_cfg.lr * min(1.0, step / optim_cfg.warmup_steps)
  return optim_cfg.lr


def model_config(cfg) -> tfm.ModelConfig:
  """The policy's ModelConfig: from `model.hf_dir` when set (compute options from the config), else the sizes."""
  m = cfg.model
  if m.hf_dir:
    return hf.config_from_hf(m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                             scan_layers=m.scan_layers)
  return tfm.ModelConfig.from_config(m)


def tokenizer_dir(cfg) -> str:
  return cfg.model.tokenizer_dir or cfg.model.hf_dir


def param_shardings(model_cfg: tfm.ModelConfig, mesh, rules=sharding.DEFAULT_RULES):
  boxed = jax.eval_shape(lambda: tfm.init_params(model_cfg, jax.random.key(0)))
  return sharding.logical_shardings(boxed, mesh, rules)


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
  params = init_params(cfg, model_cfg, mesh)
  # Moments are sharded like their params; counts are replicated.
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  # Scalars live replicated on the mesh like everything else, so a restored state lands where a fresh one does.
  step, rng = jax.device_put((jnp.zeros((), jnp.int32), jax.random.PRNGKey(cfg.seed)), sharding.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def abstract_state(state: TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

