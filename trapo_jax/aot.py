r"""--mode=compile: the configured run's programs compiled for a device topology, without its hardware, weights or data.

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/trapo_qwen25_math_7b.py

The topology is a Cloud TPU accelerator type (v4-*, v5e-*/v5litepod-*, v5p-*, v6e-*: libtpu's compile-only devices of
that slice, on any machine where libtpu is installed), `cpu:N` (N simulated host devices), or empty (this machine's
devices, e.g. its GPUs). For the config's real shapes it compiles what train/programs.py says a run runs, the
programs the trainer builds from the same functions:

  - the train step of every phase of the method (or of every registered method), with the state's and the packed
    batch's shardings (TrainState.shardings, step.packed_sharding);
  - the sampler's prefill and decode for the largest rollout call of each sampling phase;
  - the evaluation sampler, at eval.batch_size prompts x the largest eval sample count.

Per chip it prints XLA's memory plan of each program (`memory_analysis()`): parameters, optimizer state, KV cache,
temporaries and the total (arguments + outputs - donated + temporaries + code; while sampling, also the optimizer
state, which stays in memory), against the chip's HBM. When a program does not fit, the mode exits non-zero with one
line naming config keys to try. The model's shapes come from `model.hf_dir`'s config.json when it has one, else from
the config. On TPU, XLA's cost model also estimates one layer's train step and one layer's decode step against the
chip's peak: an estimate, not a measurement.

With fewer layers than the model's (`depth`: main passes the config file's own when --config.model.num_layers
lowers it), the first line says TRUNCATED, every program is compiled at that depth and at twice it, and the memory
judged is extrapolated to the model's depth along the line through the two (`extrapolate`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import paths
from trapo_jax import sharding
from trapo_jax.errors import ConfigError
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollouts as rollouts_lib
from trapo_jax.sampling.sampler import Sampler, SamplingParams, bucket, cache_shardings
from trapo_jax.train import programs as programs_lib
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib

GiB = 2 ** 30


class CompileError(RuntimeError):
  """One line for the user: a topology that cannot be had here, or a program that does not fit."""


# ----------------------------------------------------------------------------------------------------------------
# Topologies.


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's per-chip figures as Google publishes them (the page in `spec`)."""
  name: str
  hbm_gib: float
  peak_bf16_tflops: float
  hbm_gbps: float  # HBM bandwidth, GB/s
  spec: str


CHIPS = {
    "v4": Chip("v4", 32, 275, 1200, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}

# Cloud TPU accelerator type -> (chip, JAX topology). v4 and v5p names count TensorCores (two per chip), v5e and v6e
# names count chips; the slice shapes are those of the pages above.
_CUBES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8", 1024: "8x8x8"}
_PLANES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
ACCELERATOR_TYPES = {
    **{f"v4-{n}": ("v4", shape) for n, shape in _CUBES.items()},
    **{f"v5p-{n}": ("v5p", shape) for n, shape in _CUBES.items()},
    **{f"{name}-{n}": ("v5e", shape) for name in ("v5e", "v5litepod") for n, shape in _PLANES.items()},
    **{f"v6e-{n}": ("v6e", shape) for n, shape in _PLANES.items()},
}


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices to compile for and what one of them holds."""
  name: str
  devices: tuple
  hbm_bytes: float | None  # per device; None where unknown (then nothing is judged to fit or not)
  chip: Chip | None = None

  def describe(self) -> str:
    hbm = f", {_size(self.hbm_bytes)} each" if self.hbm_bytes else ""
    return f"{self.name} ({len(self.devices)} {self.devices[0].device_kind} devices{hbm})"


def prepare(topology: str) -> None:
  """What must happen before JAX starts a backend: `cpu:N` asks for N host devices, a TPU type keeps JAX off any
  attached accelerator (its devices come from libtpu's compile-only client)."""
  if topology.startswith("cpu:"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_count(topology)}").strip()
    jax.config.update("jax_platforms", "cpu")
  elif topology:
    jax.config.update("jax_platforms", "cpu")
    # Only compiles: no TPU is opened, so another process holding libtpu's lock does not matter.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Off a TPU VM libtpu's compile-only client asks the metadata server for the slice and prints its failure
    # (`E0000 ... TPU_WORKER_HOSTNAMES`, `Failed to find host bounds`); the slice it compiles for is the topology's.
    if "TPU_ACCELERATOR_TYPE" not in os.environ:  # a TPU VM's own are kept
      os.environ.update(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                        TPU_ACCELERATOR_TYPE=topology.replace("v5e-", "v5litepod-"))


def _count(topology: str) -> int:
  try:
    n = int(topology.split(":", 1)[1])
  except ValueError:
    n = 0
  if n < 1:
    raise CompileError(f"--topology={topology}: expected cpu:N with N >= 1")
  return n


def host_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def target(topology: str) -> Target:
  """The devices of `topology` (see the module docstring); call `prepare` before JAX starts."""
  if not topology:
    devices = tuple(jax.devices())
    stats = devices[0].memory_stats() or {}
    return Target(jax.default_backend(), devices, stats.get("bytes_limit"))
  if topology.startswith("cpu:"):
    devices = tuple(jax.devices("cpu"))[:_count(topology)]
    if len(devices) < _count(topology):
      raise CompileError(f"--topology={topology}: only {len(devices)} host devices (JAX started before the flag)")
    # Simulated devices share the host's memory.
    return Target(topology, devices, host_memory() / len(devices))
  if topology not in ACCELERATOR_TYPES:
    known = sorted({t.rsplit("-", 1)[0] for t in ACCELERATOR_TYPES})
    raise CompileError(f"--topology={topology}: not a Cloud TPU accelerator type this table knows ({', '.join(known)}"
                       f" with sizes {', '.join(map(str, sorted(set(_CUBES) | set(_PLANES))))}), cpu:N, or empty")
  chip_name, shape = ACCELERATOR_TYPES[topology]
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise CompileError(f"--topology={topology}: compiling for TPU needs libtpu (no TPU): "
                       f'pip install "jax[tpu]=={jax.__version__}"') from None
  from jax.experimental import topologies
  kwargs: dict[str, Any] = {}
  if chip_name == "v4":
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX runs a v4
  if shape == "1x1":
    kwargs["chips_per_host_bounds"] = (1, 1, 1)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=f"{chip_name}:{shape}", **kwargs).devices
  chip = CHIPS[chip_name]
  return Target(topology, tuple(devices), chip.hbm_gib * GiB, chip)


# ----------------------------------------------------------------------------------------------------------------
# The programs of a run.


@dataclasses.dataclass
class Program:
  kind: str  # train | rollout | eval
  name: str
  layout: str  # the shapes, in words
  lower: Callable[[], Any]  # -> jax.stages.Lowered
  kv_bytes: int = 0  # per chip
  resident: int = 0  # per chip: memory the program does not see but that stays allocated (the optimizer state)
  fixes: tuple[str, ...] = ()  # config changes to try when it does not fit
  opt_state: int = 0  # per chip: the optimizer state of the method's run (a second optimizer's included)


@dataclasses.dataclass
class Result:
  program: Program
  seconds: float
  params: int
  opt_state: int
  temp: int | None
  total: int | None  # None: XLA refused to compile it for memory and said no total
  error: str = ""  # XLA's reason when it refused

  def fits(self, hbm: float | None) -> bool | None:
    if self.error:
      return False
    return None if hbm is None or self.total is None else self.total <= hbm


def model_config(cfg) -> tuple[tfm.ModelConfig, str]:
  """The policy's ModelConfig and where its shapes came from: hf_dir's config.json when it has one, else the config."""
  if cfg.model.hf_dir and paths.exists(paths.join(cfg.model.hf_dir, "config.json")):
    return state_lib.model_config(cfg), paths.join(cfg.model.hf_dir, "config.json")
  with_sizes = copy.deepcopy(cfg)
  with_sizes.model.hf_dir = ""
  return state_lib.model_config(with_sizes), "the config's model sizes"


def _per_chip(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard where uneven)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def train_program(cfg, phase: algorithms.Phase, model_cfg: tfm.ModelConfig, mesh, tx, state, state_tx=None) -> Program:
  """The phase's jitted train step (programs.train_step, the trainer's) for its packed batch at the longest
  sequences. tx: the phase's optimizer; state_tx: the state's whole optimizer when the method has several."""
  fn = programs_lib.train_step(cfg, phase, model_cfg, mesh, tx, state_tx)
  args, lay = programs_lib.train_args(cfg, phase, mesh, state)

  def lower():
    with sharding.activate(mesh):
      return fn.lower(*args)

  fixes = []  # a count of micro-batches the phase declares fixes its layout
  if lay.micro_rows > sharding.local_batch_shards(mesh) and not programs_lib.updates_of(cfg, phase).micro_batches:
    fixes.append(f"--config.train.micro_batch_tokens={max(1, cfg.train.micro_batch_tokens // 2)}")
  if cfg.model.remat != "full":
    fixes.append("--config.model.remat=full")
  fixes += _tensor_fix(cfg, model_cfg, mesh)
  return Program("train", f"train step ({phase.name})",
                 f"{lay.rows} sequences of {lay.seq} tokens, {lay.micro_batches} micro-batches of {lay.micro_rows}",
                 lower, fixes=tuple(fixes), opt_state=_per_chip(state.opt_state))


def _tensor_fix(cfg, model_cfg, mesh) -> list[str]:
  """--config.mesh.tensor=2t where the heads and the devices allow it (weights and KV heads split twice as far)."""
  t = 2 * mesh.shape["tensor"]
  if model_cfg.num_kv_heads % t == 0 and model_cfg.num_heads % t == 0 and mesh.size % t == 0:
    return [f"--config.mesh.tensor={t}"]
  return []


def _abstract_cache(model_cfg: tfm.ModelConfig, rows: int, slots: int, mesh) -> tfm.KVCache:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(lambda: tfm.KVCache.zeros(model_cfg, rows, slots)),
                      cache_shardings(model_cfg, mesh))


def sampler_programs(label: str, sampler: Sampler, params, *, prompts: int, call: programs_lib.RolloutCall,
                     max_len: int, prompt_len: int, sp: SamplingParams, mesh, resident: int,
                     fixes: tuple[str, ...]) -> list[Program]:
  """The prefill and decode of one sampler call of `prompts` prompts; a call with branches: a one-pass call
  (Sampler.sample_shared)."""
  n, width, budget = call.rows, call.width, call.budget
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  prompts = -(-prompts // shards) * shards  # the sampler pads rows to split over the batch shards
  kv = _abstract_cache(sampler.cfg, prompts * n, width + budget, mesh)
  lowered: dict[str, Any] = {}

  def part(i):
    def lower():
      if not lowered and call.branches:
        lowered["both"] = sampler.lower_shared(
            params, prompts=prompts, prompt_len=prompt_len, max_len=max_len, prefixes=call.prefixes,
            branches=call.branches, prompt_width=call.prompt_width, prefix_width=call.prefix_width, width=width,
            budget=budget, sp=sp)
      elif not lowered:
        lowered["both"] = sampler.lower(params, prompts=prompts, prompt_len=prompt_len, max_len=max_len, width=width,
                                        budget=budget, n=n, sp=sp)
      return lowered["both"][i]
    return lower

  rows = f"{n} rows in one pass ({call.prefixes} prefixes)" if call.branches else f"{n} samples"
  layout = f"{prompts} prompts x {rows}, cache {width} + {budget} slots"
  return [Program(label, f"{label} prefill", layout, part(0), kv_bytes=_per_chip(kv), resident=resident, fixes=fixes,
                  opt_state=resident),
          Program(label, f"{label} decode", layout, part(1), kv_bytes=_per_chip(kv), resident=resident, fixes=fixes,
                  opt_state=resident)]


def run_programs(cfg, methods: tuple[str, ...], model_cfg: tfm.ModelConfig, mesh,
                 log: Callable[[str], None] = print) -> list[Program]:
  """Every program of the run for each method in `methods` (one the config cannot run is skipped, saying why), each
  distinct program once: what train/programs.py says each phase and the evaluation run."""
  tx = state_lib.make_optimizer(cfg.optim)
  state = state_lib.TrainState.abstract(model_cfg, mesh, tx)
  sampler = Sampler(model_cfg, mesh=mesh, gather_weights=rollouts_lib.gathers_weights(cfg))
  programs: dict[tuple, Program] = {}
  eval_resident = _per_chip(state.opt_state)  # the evaluation runs beside the largest optimizer state of the methods
  for name in methods:
    mcfg = copy.deepcopy(cfg)
    mcfg.algo = name
    try:
      config_lib.validate(mcfg, num_devices=mesh.size)
    except ConfigError as err:
      log(f"skipped {name}: {err}")
      continue
    method = algorithms.from_config(mcfg)
    txs = programs_lib.make_optimizers(mcfg, method)  # a second optimizer (ReLIFT's) adds its moments to the state
    state_tx = programs_lib.state_optimizer(mcfg, txs)
    mstate = state if txs is None else state_lib.TrainState.abstract(model_cfg, mesh, state_tx)
    resident = _per_chip(mstate.opt_state)
    eval_resident = max(eval_resident, resident)
    for phase in method.phases(mcfg):
      key = ("train", name, phase.name)
      programs[key] = train_program(mcfg, phase, model_cfg, mesh, programs_lib.phase_optimizer(txs, state_tx, phase),
                                    mstate, state_tx)
      if len(methods) > 1:
        programs[key].name = f"train step ({name}/{phase.name})"
      if phase.samples:
        call, max_len, sp = _rollout_call(mcfg, phase)
        key = ("rollout",) + tuple(call) + (max_len, sp)
        if key not in programs:
          for p in _rollout_programs(mcfg, call, max_len, sp, model_cfg, mesh, sampler, state.params, resident):
            programs[key + (p.name,)] = p
  e = programs_lib.eval_call(cfg)
  fixes = (f"--config.eval.batch_size={e.prompts // 2}",) if e.prompts > 1 else ()
  for p in sampler_programs("eval", sampler, state.params, prompts=e.prompts, call=e.call, max_len=e.max_len,
                            prompt_len=cfg.data.max_prompt_len, sp=e.sp, mesh=mesh, resident=eval_resident,
                            fixes=fixes + tuple(_tensor_fix(cfg, model_cfg, mesh))):
    programs[("eval", p.name)] = p
  return list(programs.values())


def _rollout_call(cfg, phase: algorithms.Phase) -> tuple[programs_lib.RolloutCall, int, SamplingParams]:
  """(call, row width, sampling) of the phase's sampler call with the most cache slots (rows x slots: its KV
  cache)."""
  max_len, _ = microgroup.response_width(phase.rows, cfg.data.max_response_len)
  return programs_lib.largest_rollout_call(cfg, phase), max_len, programs_lib.rollout_sampling(cfg)


def _rollout_programs(cfg, call: programs_lib.RolloutCall, max_len: int, sp: SamplingParams, model_cfg, mesh,
                      sampler, params, resident: int) -> list[Program]:
  """The prefill and decode of a rollout call of train.batch_prompts prompts, with the fixes to try."""
  fixes = (tuple(_tensor_fix(cfg, model_cfg, mesh)) + ("a larger slice",)
           + (("--config.rollout.one_pass=False",) if call.branches else ()))
  return sampler_programs("rollout", sampler, params, prompts=cfg.train.batch_prompts, call=call, max_len=max_len,
                          prompt_len=cfg.data.max_prompt_len, sp=sp, mesh=mesh, resident=resident, fixes=fixes)


_OOM = (re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm"),
        re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"))
_UNITS = {None: 1, "": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _needed(message: str) -> int | None:
  """The bytes an out-of-memory compile error says the program needs, if it says."""
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * _UNITS[m.group(2)])
  return None


def compile_program(program: Program, params: int) -> Result:
  """Lowers and compiles one program (timed) and reads XLA's memory plan, or its refusal for lack of memory.
  params: the parameters' bytes per chip."""
  opt = program.opt_state
  t0 = time.perf_counter()
  lowered = program.lower()
  try:
    compiled = lowered.compile()
  except Exception as err:  # XLA:TPU refuses a program larger than HBM (RESOURCE_EXHAUSTED) at compile time
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    needed = _needed(text)
    return Result(program, time.perf_counter() - t0, params, opt, None,
                  None if needed is None else needed + program.resident,
                  error=next(line for line in text.splitlines() if line.strip()))
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
           + m.generated_code_size_in_bytes + program.resident)
  return Result(program, seconds, params, opt, m.temp_size_in_bytes, total)


# ----------------------------------------------------------------------------------------------------------------
# XLA's cost model for one layer (TPU only: other backends give no time estimate).


def layer_estimates(cfg, model_cfg: tfm.ModelConfig, mesh, chip: Chip) -> dict[str, dict[str, float]]:
  """XLA's cost-model estimate of one decoder layer's train step (forward + backward of one micro-batch, the
  configured remat, every attention block unrolled so no loop hides work) and one layer's decode step (one token per
  row of the rollout batch over a full cache), per chip, against the chip's peak FLOP/s and HBM bandwidth.

  An estimate of the compiler, not a measurement.
  """
  one = model_cfg.replace(num_layers=1, attention_unroll=True)
  params = state_lib.TrainState.abstract(one, mesh, state_lib.make_optimizer(cfg.optim)).params
  rows_sh = sharding.batch_sharding(mesh, 1)
  shards = sharding.local_batch_shards(mesh)
  t = cfg.data.max_prompt_len + cfg.data.max_response_len
  phase = algorithms.from_config(cfg).phases(cfg)[0]
  rows = cfg.train.batch_prompts * phase.rows_per_prompt
  mb = step_lib.micro_batch_rows(rows, t, cfg.train.micro_batch_tokens, shards)
  tokens = jax.ShapeDtypeStruct((mb, t), jnp.int32, sharding=rows_sh)

  def train_loss(p, tok):
    return jnp.sum(tfm.forward(p, one, tok, jnp.ones(tok.shape, bool)).astype(jnp.float32))

  param_sh = jax.tree.map(lambda x: x.sharding, params)
  with sharding.activate(mesh):
    train = jax.jit(jax.grad(train_loss), out_shardings=param_sh).lower(params, tokens).compile()
  # A RolloutCall has more fields than these three (a one-pass call's contexts): name them, do not unpack it.
  call = programs_lib.largest_rollout_call(cfg, phase) if phase.samples else programs_lib.RolloutCall(
      1, bucket(cfg.data.max_prompt_len), bucket(cfg.data.max_response_len, cap=cfg.data.max_response_len))
  n, width, budget = call.rows, call.width, call.budget
  b = -(-cfg.train.batch_prompts // shards) * shards * n  # the sampler's rows: prompts padded to the shards, x n
  cache = _abstract_cache(one, b, width + budget, mesh)
  tok = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=rows_sh)

  def decode(p, c, x):  # the layer over the whole cache; the output head is left out
    return tfm.Decoder(one).apply(p, x, jnp.zeros_like(x), jnp.ones(x.shape, bool), c)

  with sharding.activate(mesh):
    dec = jax.jit(decode, donate_argnums=(1,)).lower(params, cache, tok).compile()
  out = {}
  for name, compiled in (("train", train), ("decode", dec)):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    seconds = float(cost.get("optimal_seconds", 0.0))
    if seconds <= 0:
      return {}
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    out[name] = dict(seconds=seconds, tflop=flops / 1e12, gbytes=moved / 1e9,
                     flops_of_peak=flops / seconds / (chip.peak_bf16_tflops * 1e12),
                     bandwidth_of_peak=moved / seconds / (chip.hbm_gbps * 1e9))
  out["train"]["layout"] = f"{mb // shards} x {t} tokens per chip"
  out["decode"]["layout"] = f"{b // shards} rows per chip, cache {width + budget} slots"
  return out


# ----------------------------------------------------------------------------------------------------------------
# The mode.


def _count_params(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(x: float) -> str:
  return f"{x / GiB:.3g} GiB"


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / GiB:.2f}"


def table(results: list[Result], tgt: Target) -> str:
  """The per-chip table of the compiled programs."""
  w = max([len("per chip, GiB")] + [len(r.program.name) for r in results]) + 2
  head = f"{'per chip, GiB':<{w}}{'params':>8}{'opt':>8}{'KV':>8}{'temp':>8}{'total':>8}{'HBM':>8}  fits  compile"
  lines = [head]
  for r in results:
    fits = r.fits(tgt.hbm_bytes)
    verdict = "?" if fits is None else ("yes" if fits else "NO")
    total = _gib(r.total) if r.total is not None else ">" + _gib(tgt.hbm_bytes)
    lines.append(f"{r.program.name:<{w}}{_gib(r.params):>8}{_gib(r.opt_state):>8}"
                 f"{_gib(r.program.kv_bytes) if r.program.kv_bytes else '-':>8}{_gib(r.temp):>8}{total:>8}"
                 f"{_gib(tgt.hbm_bytes):>8}  {verdict:<4}  {r.seconds:.0f} s   {r.program.layout}")
  return "\n".join(lines)


def verdict(results: list[Result], tgt: Target) -> str | None:
  """The line naming the first program that does not fit and what to try, or None."""
  for r in results:
    if r.fits(tgt.hbm_bytes) is False:
      need = f"needs {_size(r.total)} per chip" if r.total is not None else f"does not fit ({r.error})"
      chip = tgt.chip.name if tgt.chip else tgt.name
      have = f", {chip} has {_size(tgt.hbm_bytes)}" if tgt.hbm_bytes else ""
      fixes = " or ".join(r.program.fixes) or "a larger slice"
      return f"{r.program.name} {need}{have}: try {fixes}"
  return None


def validated(cfg, num_devices: int):
  """The config checked as a run would check it; data and checkpoints are not read, so their paths may be unset."""
  cfg = copy.deepcopy(cfg)
  if cfg.data.source == "demos" and not cfg.data.path:
    cfg.data.path = "(not read by --mode=compile)"
  config_lib.validate(cfg, num_devices=num_devices)
  return cfg


@dataclasses.dataclass
class Report:
  target: Target
  headline: str  # methods, model, topology, mesh
  results: list[Result]
  estimates: dict[str, dict[str, float]]  # layer_estimates (TPU only)

  def text(self) -> str:
    """The table and the estimates (the headline is logged when compiling starts)."""
    lines = [table(self.results, self.target)]
    for name, e in self.estimates.items():
      lines.append(f"XLA's estimate (not a measurement), one layer's {name} step ({e['layout']}): "
                   f"{e['seconds'] * 1e3:.2f} ms, {100 * e['flops_of_peak']:.0f}% of the chip's peak FLOP/s, "
                   f"{100 * e['bandwidth_of_peak']:.0f}% of its HBM bandwidth")
    return "\n".join(lines)


PROGRAMS = ("train", "rollout", "eval")


def extrapolate(shallow: Result, deep: Result, a: int, b: int, depth: int) -> Result:
  """A program's per-chip memory at `depth` layers from its compiles at a < b layers: every figure is a line in the
  number of layers (the layers are stacked and scanned, so the parameters, optimizer state, KV cache and the
  activations kept for the backward pass grow by a layer's worth each; the rest does not grow). The compile time
  is both compiles'. A figure XLA did not give (a refused program's temporaries) stays unknown.

  XLA's temporaries may shrink from a to b layers (its buffer reuse changes; an evaluation prefill on a v5p-32 went
  from 2 to 4 layers to a line at -6.9 GiB for 28): they are never taken below the deeper compile's, and the total
  moves with them."""
  line = lambda x, y: None if x is None or y is None else int(round(x + (y - x) * (depth - a) / (b - a)))
  program = dataclasses.replace(shallow.program, kv_bytes=line(shallow.program.kv_bytes, deep.program.kv_bytes),
                                opt_state=line(shallow.program.opt_state, deep.program.opt_state),
                                resident=line(shallow.program.resident, deep.program.resident))
  temp, total = line(shallow.temp, deep.temp), line(shallow.total, deep.total)
  if temp is not None and temp < deep.temp:
    temp, total = deep.temp, None if total is None else total + deep.temp - temp
  return Result(program, shallow.seconds + deep.seconds, line(shallow.params, deep.params),
                line(shallow.opt_state, deep.opt_state), temp, total, error=shallow.error or deep.error)


def truncation(layers: int, depth: int) -> str:
  """The first line of a compile at fewer layers than the model's, or "" at full depth."""
  if layers >= depth:
    return ""
  return (f"TRUNCATED: {layers} of the model's {depth} layers (and {second_depth(layers, depth)} to extrapolate): "
          f"the per-chip memory below is extrapolated to {depth} layers, not compiled at them")


def second_depth(layers: int, depth: int) -> int:
  """The other depth a truncated compile is made at: twice as deep, so that the slope is measured over as many
  layers as were asked for (at most the model's)."""
  return min(2 * layers, depth)


def _compile_all(cfg, methods, model_cfg, mesh, programs, log) -> list[Result]:
  params = _per_chip(state_lib.TrainState.abstract(model_cfg, mesh, state_lib.make_optimizer(cfg.optim)).params)
  results = []
  for program in run_programs(cfg, methods, model_cfg, mesh, log):
    if program.kind not in programs:
      continue
    log(f"compiling {program.name} ({model_cfg.num_layers} layers): {program.layout} ...")
    results.append(compile_program(program, params))
  return results


def compile_run(cfg, topology: str, *, all_methods: bool = False, programs: tuple[str, ...] = PROGRAMS,
                estimate: bool = True, depth: int = 0, log: Callable[[str], None] = print) -> Report:
  """Compiles the run's programs (of `programs`) for `topology` and collects XLA's memory plans and, on TPU, its
  estimates; judges nothing. depth: the model's number of layers where the config asks for fewer (0: the
  config's): each program is then compiled at two depths and its memory extrapolated to `depth`."""
  tgt = target(topology)
  # The target's platform decides what a run there would choose by backend (rollout.one_pass and gather_weights=None,
  # the projections' form: tfm.on_cpu); this process's backend is the compiling host's CPU.
  platform = tgt.devices[0].platform
  cfg = validated(rollouts_lib.resolve_by_backend(cfg, platform), len(tgt.devices))
  model_cfg, source = model_config(cfg)
  model_cfg = model_cfg.replace(platform=platform)
  depth = max(depth, model_cfg.num_layers)
  mesh = sharding.make_mesh(cfg, devices=list(tgt.devices))
  methods = algorithms.names() if all_methods else (cfg.algo,)
  headline = (f"{', '.join(methods)}: {model_cfg.model_type}, {model_cfg.num_layers} layers, "
              f"{_count_params(model_cfg.num_params)} parameters ({source}); {tgt.describe()}; mesh {dict(mesh.shape)}")
  first = truncation(model_cfg.num_layers, depth)
  for line in (first, headline):
    if line:
      log(line)
  headline = f"{first}\n{headline}" if first else headline
  results = _compile_all(cfg, methods, model_cfg, mesh, programs, log)
  if first:
    a, b = model_cfg.num_layers, second_depth(model_cfg.num_layers, depth)
    deeper = _compile_all(cfg, methods, model_cfg.replace(num_layers=b), mesh, programs, log)
    results = [extrapolate(x, y, a, b, depth) for x, y in zip(results, deeper)]
  estimates = {}
  if estimate and tgt.chip is not None:
    log("compiling one layer for XLA's cost estimates ...")
    try:
      estimates = layer_estimates(cfg, model_cfg, mesh, tgt.chip)
    except Exception as err:  # an estimate is extra: its failure must not hide the memory table
      log(f"no estimate: {str(err).splitlines()[0]}")
  return Report(tgt, headline, results, estimates)


def run(cfg, topology: str, *, all_methods: bool = False, programs: tuple[str, ...] = PROGRAMS, depth: int = 0,
        log: Callable[[str], None] = print) -> Report:
  """--mode=compile: compiles, prints the table, and raises CompileError with one line when a program does not
  fit (at `depth` layers, extrapolated, when the config asks for fewer)."""
  rep = compile_run(cfg, topology, all_methods=all_methods, programs=programs, depth=depth, log=log)
  log(rep.text())
  line = verdict(rep.results, rep.target)
  if line:
    raise CompileError(line)
  return rep
