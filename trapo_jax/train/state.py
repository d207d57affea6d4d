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
  """AdamW with global-norm clipping; constant LR after an optional linear warm-up (official: none)."""
  lr = optim_cfg.lr
  if optim_cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps)
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay))


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

