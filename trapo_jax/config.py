"""The config schema: every key an experiment may set, with its type and the official default.

Experiment files (`experiments/configs/*.py`) start from `base_config()` and change values; `validate()` rejects a
key the schema does not have, a value of the wrong type, and values that cannot work together, naming the key.
Besides the groups below, every registered method (trapo_jax/algorithms/) contributes its own group `<name>`.
"""

from __future__ import annotations

import ml_collections

from trapo_jax import algorithms
from trapo_jax import losses
from trapo_jax import sharding
from trapo_jax.errors import ConfigError, require as _require  # noqa: F401  (ConfigError: part of this module's API)

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
MODEL_TYPES = ("qwen2", "qwen3", "llama")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # trapo_jax/models/rope.py
TEMPLATES = ("train", "eval", "eval_official", "qwen3", "qwen3_no_think", "llama3")  # trapo_jax/data/templates.py
IMPORTANCE_RATIOS = ("token", "sequence")
KL_IN = ("loss", "reward")
OLD_LOGP = ("recompute", "sampler")
mesh_shape = sharding.mesh_shape


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algo = "trapo"  # a registered method: trapo_jax.algorithms.names()
  c.seed = 0

  # The policy. `hf_dir` loads a Hugging Face checkpoint; empty means a random model of the sizes below.
  c.model = ml_collections.ConfigDict(dict(
      hf_dir="",
      tokenizer_dir="",  # defaults to hf_dir
      # Without hf_dir the model is described by the keys below (random init, or shapes to compile); with hf_dir
      # they are all read from its config.json (a size set here that config.json contradicts is named in a warning),
      # except that a non-zero rope_theta or max_position_embeddings overrides config.json's (the official 7B run:
      # 40000 and 16384 on Qwen2.5-Math-7B).
      model_type="qwen2",  # qwen2 | qwen3 | llama
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      rope_theta=0.0,  # 0: config.json's with hf_dir, else 10000
      # config.json's rope_scaling: rope_type default | linear | llama3 | yarn, and the keys that type reads.
      rope_scaling=ml_collections.ConfigDict(dict(
          rope_type="default",
          factor=1.0,  # linear, llama3, yarn
          low_freq_factor=1.0,  # llama3
          high_freq_factor=4.0,  # llama3
          original_max_position_embeddings=0,  # llama3, yarn
          beta_fast=32.0,  # yarn
          beta_slow=1.0,  # yarn
          attention_factor=0.0,  # yarn: 0 = 0.1 ln(factor) + 1
      )),
      rms_norm_eps=1e-6,
      tie_embeddings=False,
      qkv_bias=True,  # qwen2: true; qwen3, llama: false
      qk_norm=False,  # qwen3: true (RMSNorm of each query and key head)
      max_position_embeddings=0,  # 0: config.json's with hf_dir, else 4096; must hold prompt + response
      dtype="float32",  # compute dtype
      param_dtype="float32",
      remat="none",  # none | full | dots: activation rematerialisation of each layer
      scan_layers=True,  # lax.scan over layers: one compiled layer, fast compiles for deep models
      attention_block=512,  # training attention runs per block of this many queries (memory O(T x block))
  ))

  # Device mesh (data, fsdp, tensor). -1 takes the devices left over; the product must equal the device count.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",  # synthetic | demos
      path="",  # demos: a local parquet/jsonl file or directory in the OpenR1 layout (trapo_jax/data/demos.py)
      data_dir="",  # where TFDS writes prepared data; empty = tfds/ beside the workdir (runs/tfds for runs/x)
      max_prompt_len=1024,
      max_response_len=8192,
      template="train",  # train | eval | eval_official | qwen3 | qwen3_no_think | llama3
      levels=(),  # synthetic task: keep only these difficulty levels (empty = all)
      shuffle_seed=0,
  ))

  # Sampling of rollouts (the micro-group schedule is a method's: see the `trapo` group).
  c.rollout = ml_collections.ConfigDict(dict(
      n=8,  # rows per prompt
      temperature=1.0,  # also divides the logits of the update's log-probs, as the official actor
      top_p=1.0,
      top_k=-1,
      # Sample every stage's alternatives in one decode pass and keep, after grading, the rows the stages would have
      # chosen (docs/algorithm.md#one-pass); False runs the stages one after the other. The same rows either way.
      # None (default): by backend, one pass on GPU/TPU, the stages on CPU (rollouts.one_pass_default).
      one_pass=ml_collections.config_dict.placeholder(bool),
      # The sampler (rollouts and evaluation) gathers the FSDP-sharded weights once per decode, in the compute dtype,
      # instead of in every decode step: a full copy of the weights per tensor shard for the decode's duration.
      # None (default): by backend, on CPU yes, on GPU/TPU no (rollouts.gather_weights_default); check a slice's
      # memory with --mode=compile before asking for it there.
      gather_weights=ml_collections.config_dict.placeholder(bool),
      # DAPO's overlong handling (docs/algorithm.md#rl-options): off by default.
      overlong_buffer=0,  # soft overlong punishment over the last this many tokens of data.max_response_len; 0 = off
      overlong_penalty=1.0,  # the punishment at data.max_response_len tokens
      overlong_filter=False,  # rows that reach data.max_response_len without EOS leave the loss
  ))

  # What every RL objective shares (docs/algorithm.md, "Normalisation"); each method adds its own terms.
  c.loss = ml_collections.ConfigDict(dict(
      clip_eps=-1.0,  # PPO clip; < 0 = no clip (official)
      entropy_coef=0.001,
      aggregation="seq_sum_over_max_len",
      seq_scale=8.0,  # official normaliser sums a GPU's 8 sequences: sum / (L_max * 8) over 64 sequences
      use_std=False,  # GRPO std normalisation of advantages (official: off)
      # RL options (docs/algorithm.md#rl-options), every one off by default.
      advantage="grpo",  # grpo | dr_grpo | rloo
      clip_eps_high=-1.0,  # DAPO clip-higher: the ratio's upper bound 1 + this (needs clip_eps); < 0 = clip_eps
      dual_clip=-1.0,  # dual-clip PPO: c > 1 caps the loss of negative advantages at -c A; < 0 = off
      importance_ratio="token",  # token | sequence (GSPO's length-normalised sequence ratio)
      tis_cap=0.0,  # sampler/trainer mismatch: importance weight pi_train / pi_sampler capped at this; 0 = off
      tis_level="token",  # token | sequence (the product over the row's own tokens)
      tis_mode="truncate",  # truncate (TIS: min(rho, cap)) | mask (MIS: rho, or 0 above the cap)
      kl_coef=0.0,  # KL to the frozen reference (initial) policy; 0 = off
      kl_estimator="k3",  # k1 | k2 | k3
      kl_in="loss",  # loss (a term of the objective) | reward (a penalty on each row's reward)
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, warmup_steps=0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=500,
      batch_prompts=8,
      micro_batch_tokens=32768,  # token budget of one gradient-accumulation micro-batch
      logprob_chunk=1024,  # chunk over T for token log-probs/entropy
      ckpt_every=100,
      keep_checkpoints=3,
      max_bad_steps=5,  # consecutive non-finite updates before the run stops
      dump_token_probs=False,  # write each step's expert/own token probabilities (token_probs/, the paper's figure)
      # PPO-style updates and DAPO's dynamic sampling (docs/algorithm.md#rl-options): off by default.
      ppo_epochs=1,  # passes over each rollout batch
      mini_batches=1,  # optimizer steps per pass, over consecutive rows
      old_logp="recompute",  # recompute (the trainer's, before the first update) | sampler (those sampled with)
      dynamic_sampling=False,  # drop groups whose rewards are all equal, refill from further prompts
      max_refill_rounds=4,  # extra prompt batches a step may draw to refill
  ))

  c.eval = ml_collections.ConfigDict(dict(
      benchmarks=("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench"),
      samples=ml_collections.ConfigDict(dict(
          aime24=32, aime25=32, amc=32, math500=1, minerva=1, olympiadbench=1, synthetic=1)),
      max_problems=-1,  # < 0 = all
      temperature=0.6,
      top_p=1.0,
      max_new_tokens=8192,
      batch_size=64,
      grader_timeout_s=10.0,
      grader_workers=2,
      template="eval_official",  # the official evaluation prompt, typo included (docs/algorithm.md#evaluation); "eval" fixes it
      every=0,  # also evaluate during training every N steps (0 = never)
      at_start=False,  # evaluate the initial policy before training
      at_end=True,  # evaluate after training
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0,
      # A process silent this long is lost and the others stop (trapo_jax/distributed.py). Sized for pods, where a
      # busy host's beat may come late (its watchdog thread waits for the GIL); launch/local.sh sets 10.
      heartbeat_timeout_s=60,
  ))
  for name in algorithms.names():
    c[name] = algorithms.get(name).config_group()
  return c


def _check_same_schema(cfg, schema, prefix: str) -> None:
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"{path}: unknown key")
    value, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: expected a group of keys, got {type(value).__name__}")
      _check_same_schema(value, ref, path + ".")
      continue
    if ref is None:  # a placeholder (None: chosen at run time), or a value of its declared type
      ok = value is None or isinstance(value, schema.get_type(key))
    elif isinstance(ref, bool) or isinstance(value, bool):
      ok = isinstance(value, bool) and isinstance(ref, bool)
    elif isinstance(ref, float):
      ok = isinstance(value, (int, float))
    elif isinstance(ref, (tuple, list)):
      ok = isinstance(value, (tuple, list))
    else:
      ok = isinstance(value, type(ref))
    if not ok:
      raise ConfigError(f"{path}: expected {type(ref).__name__}, got {type(value).__name__} ({value!r})")


def validate(cfg, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first offending key."""
  _check_same_schema(cfg, base_config(), "")
  method = algorithms.get(cfg.algo).from_config(cfg)
  m = cfg.model
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
  _require(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
  _require(m.remat in REMAT, "model.remat", f"must be one of {REMAT}")
  _require(m.model_type in MODEL_TYPES, "model.model_type", f"must be one of {MODEL_TYPES}")
  if not m.hf_dir:
    _require(m.qkv_bias == (m.model_type == "qwen2"), "model.qkv_bias",
             f"{m.model_type} has {'' if m.model_type == 'qwen2' else 'no '}q/k/v bias")
    _require(m.qk_norm == (m.model_type == "qwen3"), "model.qk_norm",
             f"{m.model_type} has {'' if m.model_type == 'qwen3' else 'no '}query/key norm")
    rs = m.rope_scaling
    _require(rs.rope_type in ROPE_TYPES, "model.rope_scaling.rope_type", f"must be one of {ROPE_TYPES}")
    _require(rs.rope_type not in ("llama3", "yarn") or rs.original_max_position_embeddings >= 1,
             "model.rope_scaling.original_max_position_embeddings", f"{rs.rope_type} needs the pretraining context")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"must divide num_heads={m.num_heads}")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
      _require(m[k] >= 1, f"model.{k}", "must be >= 1")
  d = cfg.data
  _require(d.source in ("synthetic", "demos"), "data.source", "must be synthetic or demos")
  _require(d.source != "demos" or bool(d.path), "data.path", "data.source='demos' needs a path")
  _require(d.template in TEMPLATES, "data.template", f"must be one of {TEMPLATES}")
  _require(d.max_prompt_len >= 1, "data.max_prompt_len", "must be >= 1")
  _require(d.max_response_len >= 2, "data.max_response_len", "must be >= 2")
  r = cfg.rollout
  _require(r.temperature > 0, "rollout.temperature", "must be > 0")
  _require(0 < r.top_p <= 1, "rollout.top_p", "must lie in (0, 1]")
  _require(r.n >= 1, "rollout.n", "must be >= 1")
  _require(0 <= r.overlong_buffer < d.max_response_len, "rollout.overlong_buffer",
           f"must lie in [0, data.max_response_len={d.max_response_len})")
  _require(r.overlong_penalty >= 0, "rollout.overlong_penalty", "must be >= 0")
  lc = cfg.loss
  _require(lc.aggregation in losses.AGGREGATIONS, "loss.aggregation", f"must be one of {losses.AGGREGATIONS}")
  _require(lc.advantage in losses.ADVANTAGE_ESTIMATORS, "loss.advantage",
           f"must be one of {losses.ADVANTAGE_ESTIMATORS}")
  _require(not lc.use_std or lc.advantage == "grpo", "loss.use_std", f"only GRPO's estimator divides by the std, "
           f"not {lc.advantage!r}")
  _require(lc.clip_eps_high < 0 or lc.clip_eps >= 0, "loss.clip_eps_high", "needs loss.clip_eps >= 0 (the lower bound)")
  _require(lc.dual_clip < 0 or lc.dual_clip > 1, "loss.dual_clip", "must be > 1, or < 0 for off")
  _require(lc.importance_ratio in IMPORTANCE_RATIOS, "loss.importance_ratio", f"must be one of {IMPORTANCE_RATIOS}")
  _require(lc.tis_cap >= 0, "loss.tis_cap", "must be > 0, or 0 for off")
  _require(lc.tis_level in losses.IS_LEVELS, "loss.tis_level", f"must be one of {losses.IS_LEVELS}")
  _require(lc.tis_mode in losses.IS_MODES, "loss.tis_mode", f"must be one of {losses.IS_MODES}")
  _require(lc.kl_coef >= 0, "loss.kl_coef", "must be >= 0")
  _require(lc.kl_estimator in losses.KL_ESTIMATORS, "loss.kl_estimator", f"must be one of {losses.KL_ESTIMATORS}")
  _require(lc.kl_in in KL_IN, "loss.kl_in", f"must be one of {KL_IN}")
  o = cfg.optim
  _require(o.lr > 0, "optim.lr", "must be > 0")
  _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  _require(o.grad_clip > 0, "optim.grad_clip", "must be > 0")
  t = cfg.train
  _require(t.steps >= 0, "train.steps", "must be >= 0")
  _require(t.batch_prompts >= 1, "train.batch_prompts", "must be >= 1")
  _require(t.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
  _require(t.logprob_chunk >= 1, "train.logprob_chunk", "must be >= 1")
  _require(t.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
  _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
  _require(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
  _require(t.mini_batches >= 1, "train.mini_batches", "must be >= 1")
  _require(t.old_logp in OLD_LOGP, "train.old_logp", f"must be one of {OLD_LOGP}")
  _require(lc.tis_cap == 0 or t.old_logp == "recompute", "loss.tis_cap",
           "weighs the trainer's old log-probs against the sampler's: needs train.old_logp='recompute'")
  _require(t.max_refill_rounds >= 0, "train.max_refill_rounds", "must be >= 0")
  e = cfg.eval
  for name in e.benchmarks:
    _require(name in e.samples, "eval.benchmarks", f"no sample count for {name!r} in eval.samples")
  _require(e.temperature >= 0, "eval.temperature", "must be >= 0")
  _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
  _require(e.template in TEMPLATES, "eval.template", f"must be one of {TEMPLATES}")
  # The method last: its checks may read any key above.
  method.check(cfg)
  _require(not (cfg.train.dynamic_sampling and method.initial_state(cfg)), "train.dynamic_sampling",
           f"not with {cfg.algo}, whose run state follows each step's own prompts (refilled groups come from others)")
  if num_devices is not None:
    data, fsdp, _ = mesh_shape(cfg, num_devices)
    algorithms.base.check_rows(cfg, method.phases(cfg), data * fsdp)
