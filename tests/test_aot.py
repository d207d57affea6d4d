"""--mode=compile (trapo_jax/aot.py) and the shardings stated at every jit boundary.

The compiles here are of tiny models on the 8 simulated CPU devices; compiling the 7B run for TPU slices takes
minutes a program and lives in benchmarks (benchmarks/compile_7b.py, `benchmarks.run --suite=tpu_aot`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tests import helpers
from trapo_jax import algorithms
from trapo_jax import aot
from trapo_jax import config as config_lib
from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling import rollouts
from trapo_jax.sampling.sampler import Sampler, SamplingParams, cache_shardings
from trapo_jax.train import programs
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib

ROOT = helpers.ROOT
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=4)
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_accelerator_types_name_slices_of_their_chip_count():
  """v4 and v5p names count TensorCores (two per chip), v5e and v6e names count chips."""
  assert aot.ACCELERATOR_TYPES["v5p-32"] == ("v5p", "2x2x4")
  assert aot.ACCELERATOR_TYPES["v4-8"] == ("v4", "2x2x1")
  assert aot.ACCELERATOR_TYPES["v5litepod-64"] == aot.ACCELERATOR_TYPES["v5e-64"] == ("v5e", "8x8")
  assert aot.ACCELERATOR_TYPES["v6e-16"] == ("v6e", "4x4")
  for name, (chip, shape) in aot.ACCELERATOR_TYPES.items():
    count = int(name.rsplit("-", 1)[1])
    chips = count // 2 if chip in ("v4", "v5p") else count
    assert math.prod(int(x) for x in shape.split("x")) == chips, name
    assert chip in aot.CHIPS


def test_topologies_that_cannot_be_had_say_why_in_one_line(monkeypatch):
  with pytest.raises(aot.CompileError, match=r"^--topology=v9-8: not a Cloud TPU accelerator type"):
    aot.target("v9-8")
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
  with pytest.raises(aot.CompileError, match=r'^--topology=v5p-8: compiling for TPU needs libtpu .*pip install '
                                             r'"jax\[tpu\]==' + jax.__version__):
    aot.target("v5p-8")
  with pytest.raises(aot.CompileError, match="expected cpu:N"):
    aot.target("cpu:zero")


def test_main_reports_a_bad_topology_without_a_traceback():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "trapo_jax.main", "--mode=compile", "--topology=v9-8"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("--topology=v9-8: not a Cloud TPU accelerator type")


def test_rollout_calls_of_each_method():
  cfg = config_lib.base_config()  # 1024-token prompts, 8192-token responses
  cfg.rollout.one_pass = True  # the default's choice on GPU/TPU
  calls = lambda name: programs.rollout_calls(cfg, algorithms.get(name).from_config(cfg).phases(cfg)[0])
  # One pass: every alternative of TRAPO's 4, 2, 1, 1 stages at once, 11 rows per prompt: 4 + 2 + 1 + 1
  # of its own, 2 + 1 continuing the 25 % and 50 % prefixes (up to (0.5 + 0.3) x 8192 tokens: context bucket 8192).
  (one,) = calls("trapo")
  assert one == (11, 8192, 8192, (0,) * 4 + (0, 0, 1, 1) + (0, 2) + (0,), 2, 1024, 8192)
  stages = lambda *calls: [programs.RolloutCall(*c) for c in calls]  # calls of Sampler.sample, one per stage
  assert calls("grpo") == stages((8, 1024, 8192))
  assert calls("luffy") == [(7, 1024, 8192, (0,) * 7, 0, 1024, 0)]  # the demonstration row is not sampled
  # Prefix-RFT's drawn prefixes sit in the prompt's budget (officially): prompt + prefix fill at most 1024 slots, and
  # every continuation has its 8192 (one pass: the prefix packed behind the prompt).
  assert calls("prefix_rft") == [(8, 1024, 8192, (0,) * 4 + (1,) * 4, 1, 1024, 1024)]
  assert calls("uft") == stages((8, 16384, 8192))  # one stage, hinted from the start
  cfg.rollout.one_pass = False  # stage by stage: a call per stage, the later ones continuing prefixes
  assert calls("trapo") == stages((4, 1024, 8192), (2, 8192, 8192), (1, 8192, 8192), (1, 8192, 8192))
  assert calls("luffy") == stages((7, 1024, 8192), (1, 1024, 8192))
  assert calls("prefix_rft") == stages((4, 1024, 8192), (4, 1024, 8192))
  # With the prefix in the response's budget (prefix_rft.placement = "response"), a drawn prefix may be all of a
  # demonstration but its last token: its context holds the prompt and response buckets (one pass: 1024 + 8192).
  cfg.prefix_rft.placement = "response"
  assert calls("prefix_rft") == stages((4, 1024, 8192), (4, 16384, 8192))
  cfg.rollout.one_pass = True
  assert calls("prefix_rft") == [(8, 1024 + 8192, 8192, (0,) * 4 + (1,) * 4, 1, 1024, 8192)]


def test_out_of_memory_messages_are_read():
  assert aot._needed("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                     "(35.71G) exceeds available HBM (31.25G).") == int(35.71 * 2 ** 30)
  assert aot._needed("XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 103.5G of 95.74G "
                     "hbm. Exceeded hbm capacity by 7.8G.") == int(103.5 * 2 ** 30)
  assert aot._needed("RESOURCE_EXHAUSTED: something else") is None


def test_kv_cache_declares_its_axes():
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  cfg = tfm.ModelConfig(**TINY)
  sh = cache_shardings(cfg, mesh)
  assert sh.k.spec == P(None, ("data", "fsdp"), "tensor", None, None) and sh.v.spec == sh.k.spec
  assert sh.valid.spec == P(("data", "fsdp"), None) and sh.end.spec == P()
  # One KV head cannot split over tensor=2: it stays whole on every device instead of failing.
  assert cache_shardings(cfg.replace(num_heads=2, num_kv_heads=1), mesh).k.spec == P(None, ("data", "fsdp"), None,
                                                                                        None, None)


def _equivalent(actual, stated) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), actual, stated)))


def test_the_state_is_placed_as_train_state_shardings_says():
  mesh = sharding.make_mesh(shape=(1, 4, 2))
  cfg = config_lib.base_config()
  cfg.model.update(**TINY)
  model_cfg = tfm.ModelConfig.from_config(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  stated = state_lib.TrainState.shardings(model_cfg, mesh, tx)
  state = state_lib.init_state(cfg, model_cfg, mesh, tx)
  assert _equivalent(state, stated)
  assert stated.params["params"]["lm_head"]["kernel"].spec == P("fsdp", "tensor")
  mu = stated.opt_state[1][0].mu["params"]["lm_head"]["kernel"]  # AdamW's first moment, like its parameter
  assert mu.spec == P("fsdp", "tensor")
  abstract = state_lib.TrainState.abstract(model_cfg, mesh, tx)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), state)


def test_jitted_step_and_sampler_state_their_shardings():
  """The compiled programs take and give exactly the stated shardings (nothing left to propagation)."""
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  cfg = config_lib.base_config()
  cfg.model.update(**TINY)
  cfg.data.update(max_prompt_len=8, max_response_len=8)
  model_cfg = tfm.ModelConfig.from_config(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  phase = algorithms.from_config(cfg).phases(cfg)[0]
  cfg.train.batch_prompts = 1
  program = aot.train_program(cfg, phase, model_cfg, mesh, tx, state_lib.TrainState.abstract(model_cfg, mesh, tx))
  compiled = program.lower().compile()
  state_in, batch_in, _ = compiled.input_shardings[0]
  assert _equivalent(state_lib.TrainState.abstract(model_cfg, mesh, tx), state_in)
  assert all(s.is_equivalent_to(step_lib.packed_sharding(mesh), 3) for s in jax.tree.leaves(batch_in)
             if s.spec and len(s.spec) > 1)
  state_out, _ = compiled.output_shardings
  assert _equivalent(state_lib.TrainState.abstract(model_cfg, mesh, tx), state_out)

  sampler = Sampler(model_cfg, mesh=mesh)
  params = state_lib.TrainState.abstract(model_cfg, mesh, tx).params
  prefill, decode = sampler.lower(params, prompts=4, prompt_len=8, max_len=8, width=16, budget=8, n=2,
                                  sp=SamplingParams())
  cache = decode.compile().output_shardings[1].cache
  assert cache.k.spec == P(None, ("data", "fsdp"), "tensor", None, None)
  assert prefill.compile().output_shardings.cache.k.spec == cache.k.spec


def test_one_pass_rollout_programs_compile_for_the_larger_batch():
  """--mode=compile lowers the one-pass call (Sampler.sample_shared) the trainer makes: 11 rows per prompt, the
  cache of all of them placed as stated; stage by stage, the largest stage's call."""
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  cfg = config_lib.base_config()
  cfg.model.update(**TINY)
  cfg.data.update(max_prompt_len=8, max_response_len=16)
  cfg.train.batch_prompts = 4
  cfg.rollout.one_pass = True  # the default's choice on GPU/TPU
  model_cfg = tfm.ModelConfig.from_config(cfg.model)
  rollout = lambda: [p for p in aot.run_programs(cfg, ("trapo",), model_cfg, mesh, log=lambda s: None)
                     if p.kind == "rollout"]
  prefill, decode = rollout()
  # Contexts: prompts of 8 tokens (bucket 16) and prefixes of up to 0.8 x 16 = 13 tokens (bucket 16).
  assert prefill.layout == "4 prompts x 11 rows in one pass (2 prefixes), cache 32 + 16 slots"
  lowered = decode.lower()
  assert lowered.out_info[1].tokens.shape == (4 * 11, 16)
  cache = lowered.compile().output_shardings[1].cache
  assert cache.k.spec == P(None, ("data", "fsdp"), "tensor", None, None)
  assert prefill.lower().compile().output_shardings.cache.k.spec == cache.k.spec
  # Keys and values (fp32) of 44 rows x 48 slots over all 8 chips, the valid mask over the 4 batch shards, the end.
  kv = 2 * model_cfg.num_layers * 44 * model_cfg.num_kv_heads * 48 * model_cfg.head_dim * 4 // 8 + 44 * 48 // 4 + 4
  assert decode.kv_bytes == kv and "--config.rollout.one_pass=False" in decode.fixes
  cfg.rollout.one_pass = False
  prefill, _ = rollout()
  assert prefill.layout == "4 prompts x 4 samples, cache 16 + 16 slots"


def _big_vocab_config():
  """A 1-layer model whose embedding and head (2 x 65536 x 2048 parameters, 12 bytes each with AdamW's moments)
  need 0.4 GiB of state per device on 8 devices."""
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=65536, hidden_size=2048, intermediate_size=256, num_layers=1, num_heads=16,
                   num_kv_heads=2, head_dim=128)
  cfg.data.update(max_prompt_len=16, max_response_len=16)
  cfg.train.update(batch_prompts=1, logprob_chunk=16)
  return cfg


def test_compile_mode_judges_the_fit_on_cpu_devices(monkeypatch):
  monkeypatch.setattr(aot, "host_memory", lambda: 2 * 2 ** 30)  # 256 MiB for each of 8 simulated devices
  rep = aot.compile_run(_big_vocab_config(), "cpu:8", programs=("train",), estimate=False, log=lambda s: None)
  (r,) = rep.results
  state = 2 * 65536 * 2048 * 12 / 8  # embedding and head, params and both moments, split over 8 devices
  assert r.params + r.opt_state >= state and r.total > r.params + r.opt_state + r.temp
  line = aot.verdict(rep.results, rep.target)
  assert line.startswith(f"train step (rl) needs {r.total / 2 ** 30:.3g} GiB per chip, cpu:8 has 0.25 GiB: try ")
  assert "--config.model.remat=full" in line and "--config.mesh.tensor=2" in line
  roomy = aot.Target("cpu:8", rep.target.devices, 64 * 2 ** 30)
  assert aot.verdict(rep.results, roomy) is None and r.fits(roomy.hbm_bytes)
  monkeypatch.setattr(aot, "compile_run", lambda *a, **k: rep)
  with pytest.raises(aot.CompileError, match=r"^train step \(rl\) needs .* per chip, cpu:8 has 0\.25 GiB: try"):
    aot.run(_big_vocab_config(), "cpu:8", log=lambda s: None)


def test_a_tpu_target_is_traced_as_on_a_tpu(monkeypatch, tmp_path):
  """What a run chooses by backend (rollout.one_pass and gather_weights=None; the projections' form, tfm.on_cpu) is
  chosen for the compile target's platform, not for the CPU that compiles: a program for TPU is traced as a TPU run
  traces it (as the 7B memory plans were measured), one for CPU devices as on CPU."""
  cfg = tfm.ModelConfig(**TINY)
  assert jax.default_backend() == "cpu" and tfm.on_cpu(cfg)
  assert not tfm.on_cpu(cfg.replace(platform="tpu")) and tfm.on_cpu(cfg.replace(platform="cpu"))

  seen = {}

  def compile_all(run_cfg, methods, model_cfg, mesh, progs, log):
    seen[model_cfg.platform] = (run_cfg.rollout.one_pass, run_cfg.rollout.gather_weights, tfm.on_cpu(model_cfg))
    return []

  class FakeTpu:  # what libtpu's compile-only devices report; the mesh itself is laid over this host's CPUs
    platform, device_kind = "tpu", "TPU v5p"

  monkeypatch.setattr(aot, "_compile_all", compile_all)
  real_mesh = sharding.make_mesh
  monkeypatch.setattr(aot.sharding, "make_mesh", lambda c, devices: real_mesh(c, devices=jax.devices()[:len(devices)]))
  run_cfg = helpers.tiny(helpers.config_of(), str(tmp_path))
  run_cfg.rollout.one_pass = None  # the default: chosen by backend
  assert run_cfg.rollout.gather_weights is None
  monkeypatch.setattr(aot, "target", lambda t: aot.Target(t, (FakeTpu(),) * 8, None))
  aot.compile_run(run_cfg, "v5p-16", estimate=False, log=lambda s: None)
  monkeypatch.setattr(aot, "target", lambda t: aot.Target(t, tuple(jax.devices()[:8]), None))
  aot.compile_run(run_cfg, "cpu:8", estimate=False, log=lambda s: None)
  assert seen == {"tpu": (True, False, False), "cpu": (False, True, True)}


def test_a_second_optimizer_counts_in_the_state_of_every_phase():
  """ReLIFT's fine-tuning AdamW lives in the run's state (state.slot): each of its phases holds both moments, and so
  does the memory beside its evaluation."""
  def opt_state(algo):
    cfg = config_lib.base_config()
    cfg.model.update(hf_dir="", **TINY)
    cfg.data.update(max_prompt_len=8, max_response_len=8)
    cfg.train.update(batch_prompts=8, logprob_chunk=8)
    cfg.algo = algo
    cfg.eval.update(batch_size=8, max_new_tokens=8)
    rep = aot.compile_run(cfg, "cpu:8", programs=("train", "eval"), estimate=False, log=lambda s: None)
    return {r.program.name: r.opt_state for r in rep.results}

  one = opt_state("grpo")
  two = opt_state("relift")
  assert len(two) == 4 and set(two.values()) == {2 * one["train step (rl)"]}, (one, two)
  assert one["eval decode"] == one["train step (rl)"]


_TWO_LAYER_V5P_8 = """
from trapo_jax import aot
aot.prepare("v5p-8")
from experiments.configs import trapo_qwen25_math_7b
cfg = trapo_qwen25_math_7b.get_config()
cfg.model.num_layers = 2
rep = aot.compile_run(cfg, "v5p-8", programs=("train",), estimate=False, log=lambda s: None)
(r,) = rep.results
print("RESULT", len(rep.target.devices), rep.target.hbm_bytes, r.params, r.opt_state, r.total, r.error or "-")
"""


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]\"): no TPU topology")
def test_seven_b_train_step_with_two_layers_compiles_for_a_v5p_8():
  """The 7B run's train step, 2 of its 28 layers, compiled for libtpu's abstract v5p-8 (4 chips): it fits, and its
  per-chip memory plan holds a quarter of the float32 parameters and of AdamW's two moments."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _TWO_LAYER_V5P_8], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  chips, hbm, params, opt, total, error = out.stdout.split("RESULT ", 1)[1].split()
  hidden, inter, vocab, heads, kv, head_dim = 3584, 18944, 152064, 28, 4, 128
  layer = hidden * (heads + 2 * kv) * head_dim + (heads + 2 * kv) * head_dim + heads * head_dim * hidden \
      + 3 * hidden * inter + 2 * hidden
  n = 2 * layer + 2 * vocab * hidden + hidden  # untied embedding and head
  assert int(chips) == 4 and error == "-"
  assert int(params) >= 4 * n / 4 and int(params) <= 1.01 * 4 * n / 4  # float32, split over 4 chips
  assert int(opt) >= 2 * int(params)
  assert int(params) + int(opt) < int(total) <= int(hbm)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install \"jax[tpu]\"): no TPU topology")
def test_seven_b_without_tensor_parallelism_does_not_fit_a_v5e_4():
  """The 7B run's state alone (7.6B parameters x 12 bytes over 4 chips) exceeds a v5e chip's 16 GiB."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "trapo_jax.main", "--mode=compile", "--topology=v5e-4",
                        "--config=experiments/configs/trapo_qwen25_math_7b.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("train step (rl) ") and ", v5e has 16 GiB: try " in last, last


def _result(name, params, opt, kv, temp, total, seconds=1.0, error=""):
  program = aot.Program("train", name, "", lambda: None, kv_bytes=kv, resident=opt, opt_state=opt)
  return aot.Result(program, seconds, params, opt, temp, total, error)


def test_extrapolation_is_the_line_through_two_depths():
  """Each per-chip figure at 28 layers from compiles at 2 and 4, against numpy's float64 line through the two."""
  shallow = _result("p", 3_000, 6_000, 500, 7_001, 20_000, seconds=2.0)
  deep = _result("p", 5_000, 10_000, 1_000, 9_003, 31_000, seconds=3.0)
  x = aot.extrapolate(shallow, deep, 2, 4, 28)
  line = lambda y2, y4: float(np.polyval(np.polyfit(np.array([2.0, 4.0]), np.array([y2, y4], np.float64), 1), 28.0))
  assert x.params == round(line(3_000, 5_000)) and x.opt_state == round(line(6_000, 10_000))
  assert x.temp == round(line(7_001, 9_003)) and x.total == round(line(20_000, 31_000))
  assert x.program.kv_bytes == round(line(500, 1_000)) and x.program.resident == x.program.opt_state == x.opt_state
  assert x.seconds == 5.0 and x.fits(x.total) and not x.fits(x.total - 1)
  # A program XLA refused at the deeper compile: its temporaries are unknown, and it does not fit.
  refused = _result("p", 5_000, 10_000, 1_000, None, 31_000, error="RESOURCE_EXHAUSTED: ...")
  x = aot.extrapolate(shallow, refused, 2, 4, 28)
  assert x.temp is None and x.total == round(line(20_000, 31_000)) and x.fits(1e12) is False
  # Temporaries that shrink from 2 to 4 layers are not carried below the 4-layer compile's; the total moves with them.
  shrinking = aot.extrapolate(_result("p", 3_000, 6_000, 500, 9_000, 20_000), _result("p", 5_000, 10_000, 1_000, 8_000,
                                                                                        29_000), 2, 4, 28)
  assert shrinking.temp == 8_000 and shrinking.total == round(line(20_000, 29_000)) + 8_000 - round(line(9_000, 8_000))
  assert aot.second_depth(2, 28) == 4 and aot.second_depth(20, 28) == 28
  assert aot.truncation(28, 28) == ""


def test_a_truncated_compile_says_so_first_and_extrapolates_to_the_model_depth(monkeypatch):
  """2 of 8 layers compiled (and 4): the first line says so; the parameters and optimizer state, exactly linear
  in the layers, come out as an 8-layer compile's; the total is compared with the 8-layer compile."""
  monkeypatch.setattr(aot, "host_memory", lambda: 64 * 2 ** 30)
  cfg = config_lib.base_config()
  cfg.model.update(hf_dir="", **dict(TINY, num_layers=2))
  cfg.data.update(max_prompt_len=8, max_response_len=8)
  cfg.train.update(batch_prompts=8, logprob_chunk=8)
  lines = []
  rep = aot.compile_run(cfg, "cpu:8", programs=("train",), estimate=False, depth=8, log=lines.append)
  assert lines[0] == ("TRUNCATED: 2 of the model's 8 layers (and 4 to extrapolate): the per-chip memory below is "
                      "extrapolated to 8 layers, not compiled at them")
  assert rep.headline.splitlines()[0] == lines[0]
  assert sum(line.startswith("compiling train step (rl) (") for line in lines) == 2  # at 2 and at 4 layers
  cfg.model.num_layers = 8
  full = aot.compile_run(cfg, "cpu:8", programs=("train",), estimate=False, log=lambda s: None)
  assert not full.headline.startswith("TRUNCATED")
  (x,), (f,) = rep.results, full.results
  assert (x.params, x.opt_state) == (f.params, f.opt_state)
  assert abs(x.total - f.total) <= 0.05 * f.total, (x.total, f.total)


def test_main_says_a_compile_is_truncated_in_its_first_line():
  """--config.model.num_layers below the config file's own depth: main passes that depth to the extrapolation."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "trapo_jax.main", "--mode=compile", "--topology=cpu:8",
                        "--config.model.hf_dir=", "--config.model.num_layers=1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines()[0].startswith("TRUNCATED: 1 of the model's 2 layers (and 2 to extrapolate)"), \
      out.stdout[:500]


def test_the_cost_estimate_reads_a_one_pass_rollout_call():
  """layer_estimates names the fields of the largest rollout call (a one-pass call has seven): it used to unpack
  three and fail. On CPU, XLA gives no time estimate, so there is none."""
  mesh = sharding.make_mesh(shape=(1, 8, 1))
  cfg = config_lib.base_config()
  cfg.model.update(hf_dir="", **TINY)
  cfg.data.update(max_prompt_len=8, max_response_len=8)
  cfg.train.update(batch_prompts=8, logprob_chunk=8)
  cfg.rollout.one_pass = True  # what a TPU target resolves the default to
  assert len(programs.rollout_calls(cfg, algorithms.from_config(cfg).phases(cfg)[0])[0]) > 3
  assert aot.layer_estimates(cfg, tfm.ModelConfig.from_config(cfg.model), mesh, aot.CHIPS["v5p"]) == {}


def test_an_absent_tpu_is_not_probed_where_libtpu_is_installed(monkeypatch):
  """With libtpu installed and no TPU chip, JAX is told to use the CPU (its libtpu probe prints errors); a set
  JAX_PLATFORMS or an attached TPU is left alone."""
  import importlib.util as util
  import trapo_jax
  from jax._src import hardware_utils
  find = util.find_spec
  monkeypatch.setattr(util, "find_spec", lambda name, *a: object() if name == "libtpu" else
                      (None if "plugin" in name else find(name, *a)))
  for chips, preset, expected in ((0, None, "cpu"), (4, None, None), (0, "cpu,tpu", "cpu,tpu")):
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda c=chips: (c, None))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the test process keeps its platforms
    if preset is None:
      monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
      monkeypatch.setenv("JAX_PLATFORMS", preset)
    trapo_jax._skip_an_absent_tpu()
    assert os.environ.get("JAX_PLATFORMS") == expected, (chips, preset)


def test_compiling_for_a_tpu_type_sets_the_slice_for_libtpu_off_a_tpu_vm(monkeypatch):
  """Off a TPU VM libtpu's compile-only client asks the metadata server for the slice and prints why it failed;
  the variables it would read are the topology's. A TPU VM's own are kept."""
  monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("TPU_")})
  aot.prepare("v5e-16")
  assert (os.environ["TPU_ACCELERATOR_TYPE"], os.environ["TPU_WORKER_HOSTNAMES"], os.environ["TPU_SKIP_MDS_QUERY"]) \
      == ("v5litepod-16", "localhost", "1")
  monkeypatch.setattr(os, "environ", {"TPU_ACCELERATOR_TYPE": "v5p-64", "TPU_WORKER_HOSTNAMES": "10.0.0.2"})
  aot.prepare("v5p-32")
  assert os.environ["TPU_WORKER_HOSTNAMES"] == "10.0.0.2" and os.environ["TPU_ACCELERATOR_TYPE"] == "v5p-64"


_NOISE = ("TPU_WORKER_HOSTNAMES", "E0000", "Failed to find host bounds")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: its log lines cannot be seen")
def test_libtpu_prints_nothing_on_a_cpu_command_or_a_tpu_compile():
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  cpu = subprocess.run([sys.executable, "-c", "import trapo_jax, jax; print(jax.devices())"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert cpu.returncode == 0 and "CpuDevice" in cpu.stdout and not any(s in cpu.stderr for s in _NOISE), cpu.stderr
  code = "from trapo_jax import aot; aot.prepare('v5p-32'); print(aot.target('v5p-32').describe())"
  tpu = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert tpu.returncode == 0 and "16 TPU v5 devices" in tpu.stdout, tpu.stderr[-2000:]
  assert not any(s in tpu.stderr for s in _NOISE), tpu.stderr


def test_compile_mode_lowers_the_declared_micro_and_mini_batches():
  """HPT sums 2 micro-batches per mini-batch and takes 2 mini-batches (hpt.micro_batches, hpt.mini_batches): the
  compiled train step is the trainer's, on 4 micro-batches of 16 rows whatever the token budget."""
  cfg = config_lib.base_config()
  cfg.model.update(hf_dir="", **TINY)
  cfg.data.update(max_prompt_len=8, max_response_len=8)
  cfg.train.update(batch_prompts=8, logprob_chunk=8, micro_batch_tokens=1 << 20)
  cfg.algo = "hpt"
  rep = aot.compile_run(cfg, "cpu:8", programs=("train",), estimate=False, log=lambda s: None)
  (r,) = rep.results
  assert r.program.layout.endswith("4 micro-batches of 16") and not r.error, (r.program.layout, r.error)


def test_the_backend_defaults_are_chosen_for_the_compile_target_not_the_host():
  """rollout.one_pass=None: --mode=compile for a TPU slice lowers the one-pass call a TPU run makes, although the
  compiling host is a CPU; for cpu:N the stages, as training on CPU runs them. rollout.gather_weights=None alike:
  a TPU slice's decode keeps its weights sharded, a CPU run's gathers them."""
  cfg = config_lib.base_config()
  assert cfg.rollout.one_pass is None and cfg.rollout.gather_weights is None
  on_tpu = rollouts.resolve_by_backend(cfg, "tpu")
  assert on_tpu.rollout.one_pass is True and cfg.rollout.one_pass is None  # a copy: the run's config is unchanged
  assert on_tpu.rollout.gather_weights is False and cfg.rollout.gather_weights is None
  on_cpu, on_gpu = rollouts.resolve_by_backend(cfg, "cpu"), rollouts.resolve_by_backend(cfg, "gpu")
  assert on_cpu.rollout.one_pass is False and on_cpu.rollout.gather_weights is True
  assert on_gpu.rollout.one_pass is True and on_gpu.rollout.gather_weights is False
  assert rollouts.gathers_weights(on_tpu) is False and rollouts.gathers_weights(on_cpu) is True
  assert rollouts.gathers_weights(cfg) is (jax.default_backend() == "cpu")
  cfg.rollout.one_pass = True  # asked for: kept on any target
  assert rollouts.resolve_by_backend(cfg, "cpu").rollout.one_pass is True
  cfg.rollout.gather_weights = True
  assert rollouts.resolve_by_backend(cfg, "tpu") is cfg
  plan = algorithms.from_config(on_tpu).phases(on_tpu)[0]
  assert len(programs.rollout_calls(on_tpu, plan)) == 1  # one call of every alternative
  off = rollouts.resolve_by_backend(config_lib.base_config(), "cpu")
  assert len(programs.rollout_calls(off, algorithms.from_config(off).phases(off)[0])) == len(off.trapo.stages)
