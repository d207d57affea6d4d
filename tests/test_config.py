"""Config validation: unknown keys, wrong types and impossible values fail at once, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from experiments.configs import default
from tests import helpers
from trapo_jax import algorithms
from trapo_jax import config as config_lib

ROOT = helpers.ROOT
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
# Every config file, and every registered method as it runs from the default one (--config.algo=NAME alone).
RUNS = CONFIGS + [f"algo={m}" for m in algorithms.names() if m != default.get_config().algo]


def _config(name: str):
  import importlib
  if name.startswith("algo="):
    cfg = default.get_config()
    cfg.algo = name[len("algo="):]
    return cfg
  return importlib.import_module(f"experiments.configs.{name}").get_config()


@pytest.mark.parametrize("name", RUNS)
def test_every_experiment_config_validates(name):
  cfg = _config(name)
  if cfg.data.source == "demos" and not cfg.data.path:  # the real-model runs leave both to the command line
    cfg.model.hf_dir, cfg.data.path = "/some/model", "/some/data.parquet"
  config_lib.validate(cfg, num_devices=8)


def _typed(node, prefix=""):
  """{dotted key: (type name, value)} of a config, so that 1 and 1.0 or () and [] differ."""
  if isinstance(node, ml_collections.ConfigDict):
    return {k: v for key in node.keys() for k, v in _typed(node[key], f"{prefix}{key}.").items()}
  return {prefix[:-1]: (type(node).__name__, node)}


@pytest.mark.parametrize("name", RUNS)
def test_the_stored_config_reads_back_as_written(name, tmp_path):
  from trapo_jax.train import workdir as workdir_lib
  cfg = _config(name)
  workdir_lib.save_config(str(tmp_path), cfg)
  assert _typed(workdir_lib.stored_config(str(tmp_path))) == _typed(cfg)


def _retype(cfg, path: str, value):
  """Sets a value of another type, as a hand-written config file can (ConfigDict refuses it on assignment)."""
  group, key = path.split(".")
  cfg[group] = ml_collections.ConfigDict({**cfg[group].to_dict(), key: value})


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.optim.__setattr__("betas", 0.9), "optim.betas: unknown key"),
    (lambda c: _retype(c, "model.hidden_size", "big"), "model.hidden_size: expected int, got str"),
    (lambda c: _retype(c, "train.steps", 2.5), "train.steps: expected int, got float"),
    (lambda c: _retype(c, "loss.use_std", 1), "loss.use_std: expected bool, got int"),
    (lambda c: c.__setitem__("algo", "ppo"), "algo: unknown method 'ppo' (registered: chord_mu, chord_phi, grpo, "),
    (lambda c: c.trapo.__setitem__("stages", (4, 2, 1)), "trapo.stages: sizes (4, 2, 1) must sum to rollout.n=8"),
    (lambda c: c.mesh.__setitem__("tensor", 3), "mesh: (1, -1, 3) cannot fill 8 devices"),
    (lambda c: (c.mesh.__setitem__("fsdp", 2), c.mesh.__setitem__("data", 2)), "mesh: shape (2, 2, 1) needs 4"),
    (lambda c: c.trapo.__setitem__("prefix_loss", "kl"), "trapo.prefix_loss: must be one of"),
    (lambda c: c.__setitem__("algo", "luffy") or c.luffy.__setitem__("gamma", 0.0), "luffy.gamma: must be > 0"),
    (lambda c: c.__setitem__("algo", "luffy") or c.rollout.__setitem__("n", 1), "rollout.n: luffy needs"),
    (lambda c: c.__setitem__("algo", "hpt") or c.hpt.__setitem__("gate", 8), "hpt.gate: must lie in [0, rollout.n=8)"),
    (lambda c: c.__setitem__("algo", "chord_mu") or c.chord_mu.__setitem__("expert_share", 0.5),
     "chord_mu.expert_share: gives 8 demonstration rows per prompt"),
    (lambda c: c.__setitem__("algo", "prefix_rft") or c.prefix_rft.__setitem__("stages", (4, 2)),
     "prefix_rft.stages: sizes (4, 2) must sum to rollout.n=8"),
    (lambda c: c.__setitem__("algo", "relift") or c.relift.__setitem__("buffer_batches", 0.0),
     "relift.buffer_batches: must be > 0"),
    (lambda c: c.data.__setitem__("source", "demos"), "data.path: data.source='demos' needs a path"),
    (lambda c: c.model.__setitem__("num_kv_heads", 3), "model.num_kv_heads: must divide num_heads=4"),
])
def test_bad_values_name_the_key(mutate, message):
  cfg = config_lib.base_config()
  with cfg.unlocked():
    mutate(cfg)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, num_devices=8)
  assert str(e.value).startswith(message.split(":")[0] + ":") and message in str(e.value)


def _main(*args):
  env = helpers.cpu_env(8)
  return subprocess.run([sys.executable, "-m", "trapo_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config.optim.betas=0.9"], "config error: optim.betas: unknown key"),
    (["--config.optim.lr=fast"], "config error: flag --config.optim.lr=fast"),
    (["--config.mesh.tensor=3"], "config error: mesh: (1, -1, 3) cannot fill 8 devices"),
    (["--config.rollout.top_p=1.5"], "config error: rollout.top_p: must lie in (0, 1]"),
    (["--config=experiments/configs/missing.py"], "config error:"),
])
def test_main_exits_with_one_line_naming_the_key(args, message):
  proc = _main(*args, "--workdir=/nonexistent/never/written")
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
  assert lines[-1].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists("/nonexistent/never/written")


def test_override_reaches_the_config():
  # config_flags registers overrides from sys.argv when the flag is defined, so this runs in a fresh interpreter.
  code = ("import sys; sys.argv = ['prog', '--config.optim.lr=3e-6', '--config.trapo.stages=(4,2,2)'];"
          "from trapo_jax import main; main.parse_flags(sys.argv); c = main._CONFIG.value;"
          "print(c.optim.lr, tuple(c.trapo.stages), c.algo)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["3e-06", "(4,", "2,", "2)", "trapo"]


def test_sft_then_rl_splits_the_overridden_budget_in_half():
  # A sweep sets train.steps on the command line; the SFT phase must follow it, unless it is set itself.
  code = ("import sys; from trapo_jax import main, algorithms; main.parse_flags(sys.argv); c = main._CONFIG.value;"
          "m = algorithms.from_config(c); print(c.train.steps, m.sft_steps_of(c),"
          "[m.phase_at(c, s).name for s in (0, m.sft_steps_of(c) - 1, m.sft_steps_of(c))])")
  run = lambda *args: subprocess.run([sys.executable, "-c", code, "--config=experiments/configs/default.py",
                                      "--config.algo=sft_then_rl", *args],
                                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  for args, expected in ((["--config.train.steps=40"], ["40", "20", "['sft',", "'sft',", "'rl']"]),
                         (["--config.train.steps=40", "--config.sft_then_rl.sft_steps=5"],
                          ["40", "5", "['sft',", "'sft',", "'rl']"])):
    out = run(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == expected


def test_model_keys_must_agree_with_the_model_type():
  from trapo_jax.models import rope
  from trapo_jax.models import transformer as tfm
  cfg = config_lib.base_config()
  cfg.model.model_type = "qwen3"
  cfg.model.qkv_bias = False
  with pytest.raises(config_lib.ConfigError, match=r"^model\.qk_norm: qwen3 has query/key norm"):
    config_lib.validate(cfg)
  cfg.model.qk_norm = True
  cfg.model.rope_scaling.rope_type = "llama3"
  with pytest.raises(config_lib.ConfigError, match=r"^model\.rope_scaling\.original_max_position_embeddings"):
    config_lib.validate(cfg)
  cfg.model.rope_scaling.original_max_position_embeddings = 8192
  config_lib.validate(cfg)
  assert tfm.ModelConfig.from_config(cfg.model).rope_scaling == rope.RopeScaling(
      "llama3", original_max_position_embeddings=8192)


# Parameter counts of the public checkpoints (Llama-3.1-8B: 8,030,261,248 as Meta states it; the Qwen model cards
# give 7.61B, 1.54B and 8.2B): the shapes an experiment config names are its model's.
CONFIG_PARAMS = {"trapo_qwen25_math_7b": (7.61e9, 0.01e9), "trapo_qwen25_math_1p5b": (1.54e9, 0.01e9),
                 "trapo_llama31_8b": (8_030_261_248, 0), "trapo_qwen3_8b": (8.2e9, 0.05e9)}


@pytest.mark.parametrize("name", sorted(CONFIG_PARAMS))
def test_real_model_configs_name_their_model(name):
  import importlib
  from trapo_jax.models import hf
  from trapo_jax.models import transformer as tfm
  cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
  cfg.model.hf_dir = cfg.data.path = "/abstract"
  config_lib.validate(cfg)
  model_cfg = tfm.ModelConfig.from_config(cfg.model)
  expected, tol = CONFIG_PARAMS[name]
  assert abs(model_cfg.num_params - expected) <= tol
  assert hf.hf_config_dict(model_cfg)["model_type"] == cfg.model.model_type  # exportable as it stands


def test_a_model_shorter_than_a_sequence_names_the_overrides():
  """A stock Qwen2.5-Math-7B has 4096 positions; the official run's 1024 + 8192 tokens need its 16k setting."""
  import json
  import re
  from trapo_jax.data import synthetic
  from trapo_jax.train import state as state_lib
  cfg = config_lib.base_config()
  cfg.model.hf_dir = synthetic.BASE_POLICY_DIR
  declared = json.load(open(os.path.join(synthetic.BASE_POLICY_DIR, "config.json")))
  cfg.data.update(max_prompt_len=400, max_response_len=declared["max_position_embeddings"])
  need = 400 + declared["max_position_embeddings"]
  with pytest.raises(config_lib.ConfigError, match="^" + re.escape(
      f"model.max_position_embeddings: {synthetic.BASE_POLICY_DIR}/config.json declares "
      f"{declared['max_position_embeddings']} positions, a sequence here has 400 + "
      f"{declared['max_position_embeddings']} = {need} tokens: add --config.model.rope_theta=40000 "
      "--config.model.max_position_embeddings=16384 (the official 7B run's), or shorten data.max_response_len")):
    state_lib.model_config(cfg)
  cfg.model.update(rope_theta=40000.0, max_position_embeddings=need)  # the overrides
  model_cfg = state_lib.model_config(cfg)
  assert (model_cfg.rope_theta, model_cfg.max_position_embeddings) == (40000.0, need)
  assert model_cfg.hidden_size == declared["hidden_size"]  # everything else is the checkpoint's
  # Without hf_dir the config's sizes are the model: unset, 4096 positions.
  cfg.model.update(hf_dir="", rope_theta=0.0, max_position_embeddings=0)
  cfg.data.update(max_prompt_len=1024, max_response_len=8192)
  with pytest.raises(config_lib.ConfigError, match=r"^model\.max_position_embeddings: the config declares 4096 "
                     r"positions, a sequence here has 1024 \+ 8192 = 9216 tokens: add --config\.model\.rope_theta="):
    state_lib.model_config(cfg)


def test_sizes_a_checkpoint_contradicts_are_named(caplog):
  """With hf_dir, config.json decides the sizes: a size the config set to something else is named, not dropped
  silently; the base config's untouched defaults (the default experiment's case) and agreeing sizes say nothing."""
  import json
  import logging
  from experiments.configs import default
  from trapo_jax.data import synthetic
  from trapo_jax.train import state as state_lib
  declared = json.load(open(os.path.join(synthetic.BASE_POLICY_DIR, "config.json")))
  cfg = default.get_config()
  assert cfg.model.hf_dir == synthetic.BASE_POLICY_DIR

  def warnings():
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      model_cfg = state_lib.model_config(cfg)
    assert model_cfg.num_layers == declared["num_hidden_layers"]
    return [r.getMessage() for r in caplog.records if "config.json describes the model" in r.getMessage()]

  assert cfg.model.num_layers != declared["num_hidden_layers"] and warnings() == []
  cfg.model.update(num_layers=declared["num_hidden_layers"], hidden_size=declared["hidden_size"])  # agreeing
  assert warnings() == []
  assert declared["model_type"] == "qwen2"  # q/k/v bias
  cfg.model.update(num_layers=declared["num_hidden_layers"] + 3, qkv_bias=False)
  assert warnings() == [
      f"{synthetic.BASE_POLICY_DIR}/config.json describes the model; the config's "
      f"model.num_layers={declared['num_hidden_layers'] + 3} (config.json: {declared['num_hidden_layers']}), "
      "model.qkv_bias=False (config.json: True) are not used"]


def test_the_7b_config_is_the_official_16k_setting():
  from experiments.configs import trapo_qwen25_math_7b
  from trapo_jax.train import state as state_lib
  model_cfg = state_lib.model_config(trapo_qwen25_math_7b.get_config())  # no hf_dir: its sizes, nothing read
  assert (model_cfg.rope_theta, model_cfg.max_position_embeddings) == (40000.0, 16384)


def test_main_stops_at_a_short_checkpoint_with_one_line(tmp_path):
  proc = _main("--config.data.max_prompt_len=400", "--config.data.max_response_len=500", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("config error: model.max_position_embeddings: ") and "--config.model.rope_theta=40000" in last


def test_a_method_named_on_the_command_line_gets_its_own_default_workdir():
  from trapo_jax import main
  assert main.workdir_for("experiments/configs/default.py", {}) == os.path.join("runs", "default")
  assert main.workdir_for("experiments/configs/default.py", {"algo": "grpo", "seed": 1}) == os.path.join("runs", "grpo")
  assert main.workdir_for("/x/trapo_qwen25_math_7b.py", {"seed": 1}) == os.path.join("runs", "trapo_qwen25_math_7b")
