"""Each supported family against Hugging Face transformers (PyTorch CPU): logits, greedy decode with the KV cache,
load -> save -> load, sharding; the RoPE types against transformers' own tables; what is refused, and how.

Every family is a small random model built from a config.json that copies its public checkpoint's values for all but
the sizes. RoPE scalings use a small `original_max_position_embeddings`, so that the sequences run past it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trapo_jax import config as config_lib  # noqa: E402
from trapo_jax import sharding  # noqa: E402
from trapo_jax.models import hf  # noqa: E402
from trapo_jax.models import rope  # noqa: E402
from trapo_jax.models import transformer as tfm  # noqa: E402
from trapo_jax.sampling.sampler import Sampler  # noqa: E402

# Tiny sizes shared by every case (vocab divisible by the tensor axis of the (2, 2, 2) mesh).
_TINY = dict(vocab_size=128, intermediate_size=48, num_hidden_layers=2)

# The config.json of each public checkpoint with its sizes shrunk and its token ids left out (they index the real
# vocabulary). Sources: Qwen3-0.6B and Llama-3.2-1B, Llama-3.1-8B: their config.json as printed in public code and
# notes; Qwen3-8B: Qwen3-8B-Base's config.json as a public repository ships it, with the post-trained model's 40960
# positions (its model card); Qwen2.5-Math-1.5B: max_position_embeddings and rope_theta as public training docs quote
# them, the rest from memory of the file (the Qwen2.5 line's conventions). Real sizes, for reference: Qwen3-0.6B
# hidden 1024, 16/8 heads of 128 (head_dim twice hidden/heads, kept so here); Qwen3-8B 4096, 32/8 x 128;
# Llama-3.1-8B 4096, 32/8 (no head_dim field); Llama-3.2-1B 2048, 32/8 x 64; Qwen2.5-Math-1.5B 1536, 12/2 (no field).
FAMILIES = {
    # Qwen/Qwen3-0.6B: tied embeddings, explicit head_dim, no bias, q/k norms, theta 1e6.
    "qwen3_0p6b": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
        max_position_embeddings=40960, max_window_layers=28, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
        use_sliding_window=False),
    # Qwen/Qwen3-8B: untied; with the YaRN block its model card gives for 131072 tokens
    # ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), original shrunk to 64.
    "qwen3_8b_yarn": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
        max_position_embeddings=40960, max_window_layers=36, rms_norm_eps=1e-6, rope_theta=1000000,
        sliding_window=None, tie_word_embeddings=False, use_sliding_window=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    # meta-llama/Llama-3.1-8B: untied, llama3 scaling (factor 8, original 8192 shrunk to 40), rms eps 1e-5.
    "llama31_8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
        num_key_value_heads=1, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
        max_position_embeddings=131072, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 40, "rope_type": "llama3"}),
    # meta-llama/Llama-3.2-1B: tied, explicit head_dim, llama3 scaling with factor 32 (original 8192 shrunk to 40).
    "llama32_1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
        max_position_embeddings=131072, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 40, "rope_type": "llama3"}),
    # Qwen/Qwen2.5-Math-1.5B: q/k/v bias, tied, theta 10000, 4096 positions.
    "qwen25_math_1p5b": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=48, num_attention_heads=4,
        num_key_value_heads=2, attention_dropout=0.0, hidden_act="silu", max_position_embeddings=4096,
        max_window_layers=21, rms_norm_eps=1e-6, rope_theta=10000, sliding_window=4096, tie_word_embeddings=True,
        use_mrope=False, use_sliding_window=False),
}
# No checkpoint of these families ships linear scaling; it is exercised on Qwen2.5-Math-1.5B's values, with the
# older `type` spelling of the key.
CHECKPOINTS = sorted(FAMILIES)
FAMILIES["qwen25_linear"] = dict(FAMILIES["qwen25_math_1p5b"], rope_scaling={"type": "linear", "factor": 4.0})

T = 72  # past every original_max_position_embeddings above (40, 64)


def _raw(name: str) -> dict:
  return dict(_TINY, **FAMILIES[name])


def _hf_model(raw: dict, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw),
                                                        dtype=torch.float32).eval()
  with torch.no_grad():
    # Random values everywhere (biases and norm scales too), so a swapped or transposed tensor cannot hide.
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
  return model


def _batch(vocab: int, t: int = T, seed: int = 0):
  """4 rows (the batch shards of the mesh), three of them left-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (4, t))
  mask = np.arange(t)[None, :] >= np.array([[0], [3], [5], [1]])
  return tokens, mask


_forward = jax.jit(tfm.forward_logits, static_argnums=1)


def _hf_logits(model, tokens, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(pos))
  return out.logits.numpy()


_BUILT: dict[str, tuple] = {}


def _build(name: str, tmp_path_factory):
  """(HF model, our config, our params loaded from a directory with its weights and checkpoint-style config.json)."""
  if name not in _BUILT:
    raw = _raw(name)
    model = _hf_model(raw)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(raw, f)  # the checkpoint's own layout (rope_scaling, rope_theta), not what this transformers writes
    _BUILT[name] = (model, *hf.load_hf(path))
  return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint(request, tmp_path_factory):
  """The public checkpoints only: the sampler and the mesh see RoPE only through its tables, which the scaled
  checkpoints (llama3, yarn) already exercise."""
  return _build(request.param, tmp_path_factory)


def test_logits_match_transformers_past_the_original_context(family):
  model, cfg, params = family
  tokens, mask = _batch(cfg.vocab_size)
  ours = np.asarray(_forward(params, cfg, tokens, mask))
  ref = _hf_logits(model, tokens, mask)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


def test_greedy_decode_equals_transformers_generate(checkpoint):
  model, cfg, params = checkpoint
  rng = np.random.default_rng(1)
  lens = np.array([60, 45, 52])  # decoding runs past the original context of the scaled RoPEs
  prompts = np.zeros((3, lens.max()), np.int64)
  left, attn = np.zeros_like(prompts), np.zeros_like(prompts)
  for i, n in enumerate(lens):
    prompts[i, :n] = rng.integers(1, cfg.vocab_size, n)
    left[i, -n:], attn[i, -n:] = prompts[i, :n], 1
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(attn), max_new_tokens=10,
                         do_sample=False, pad_token_id=0, eos_token_id=None)[:, prompts.shape[1]:].numpy()
  out = Sampler(cfg).sample(params, prompts, lens, max_len=10, rng=jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_load_save_load_is_exact(family, tmp_path):
  model, cfg, params = family
  out = str(tmp_path / "saved")
  hf.save_hf(out, cfg, params)
  cfg2, params2 = hf.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The exported directory is what transformers loads: the same model, bit for bit.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens, mask = _batch(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask), _hf_logits(model, tokens, mask))


def test_sharded_forward_equals_single_device(checkpoint):
  _, cfg, params = checkpoint
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  shardings = sharding.logical_shardings(jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0))), mesh)
  placed = sharding.put_global(params, shardings)
  q = placed["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape != q.shape  # actually split, not replicated
  tokens, mask = _batch(cfg.vocab_size)
  batch = sharding.put_batch(mesh, {"t": tokens, "m": mask})
  with sharding.activate(mesh):
    sharded = jax.jit(lambda p, t, m: tfm.forward_logits(p, cfg, t, m))(placed, batch["t"], batch["m"])
  single = _forward(params, cfg, tokens, mask)
  # Both are exact up to fp32 summation order, as our forward and transformers' are: the same bound applies.
  np.testing.assert_allclose(np.asarray(sharded)[mask], np.asarray(single)[mask], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The RoPE tables at the real checkpoints' sizes, against transformers' own functions.

ROPE_CASES = {
    "default": (128, 1000000.0, 40960, None),
    "linear": (128, 10000.0, 4096, {"rope_type": "linear", "factor": 4.0}),
    "llama3_llama31_8b": (128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3_llama32_1b": (64, 500000.0, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen2.5's model card spelling (`type`), then Qwen3's; then every optional yarn key set.
    "yarn_qwen25": (128, 1000000.0, 32768, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn_qwen3": (128, 1000000.0, 40960, {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32768}),
    "yarn_explicit": (64, 10000.0, 16384, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                                           "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.25}),
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rope_tables_match_transformers(name):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  head_dim, theta, max_pos, scaling = ROPE_CASES[name]
  hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=max_pos, rope_theta=theta, rope_scaling=scaling)
  if scaling is None:
    ref, ref_scale = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
        hf_cfg)
  else:
    ref, ref_scale = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
  ours, scale = rope.frequencies(rope.from_hf(dict(hf_cfg.rope_parameters), max_pos), head_dim, theta)
  # transformers computes the table in fp32, ours in fp64: a few fp32 roundings apart.
  np.testing.assert_allclose(ours, ref.numpy(), rtol=2e-6, atol=0)
  assert scale == pytest.approx(ref_scale, rel=1e-12)


def test_llama3_table_has_its_three_bands():
  """Kept (short wavelengths), blended and divided by `factor` (long ones): each band present at Llama-3.1-8B's
  sizes, and in the tiny test model (so that the parity tests above see all three)."""
  for head_dim, orig in ((128, 8192), (16, 40)):
    s = rope.RopeScaling("llama3", factor=8.0, original_max_position_embeddings=orig)
    ours, _ = rope.frequencies(s, head_dim, 500000.0)
    base, _ = rope.frequencies(rope.RopeScaling(), head_dim, 500000.0)
    ratio = base / ours
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_rope_types_agree_with_the_config_schema():
  assert config_lib.ROPE_TYPES == tuple(rope.TYPES) == tuple(rope.KEYS)
  assert config_lib.MODEL_TYPES == tuple(hf.FAMILIES)


# ---------------------------------------------------------------------------------------------------------------
# What is refused: one line naming the config.json field.

REFUSED = {
    "sliding_window": ({"use_sliding_window": True, "sliding_window": 16}, r"use_sliding_window=true"),
    "sliding_layer": ({"layer_types": ["full_attention", "sliding_attention"]},
                      r"layer_types\[1\]='sliding_attention'"),
    "moe": ({"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
            r"num_experts=128: mixture-of-experts"),
    "multimodal": ({"vision_config": {"depth": 2}}, r"vision_config: multimodal"),
    "dynamic_rope": ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                     r"rope_scaling\.rope_type: 'dynamic' is not supported"),
    "yarn_mscale": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "mscale": 0.707}}, r"rope_scaling\.mscale=0\.707"),
    "partial_rotary": ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5"),
    "attention_bias": ({"attention_bias": True}, r"attention_bias=true"),
    "llama3_without_factor": ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}},
                              r"rope_parameters.*'llama3'.*'factor'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_configs_are_refused_naming_the_field(name, tmp_path):
  change, message = REFUSED[name]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(_raw("qwen3_0p6b"), **change), f)
  with pytest.raises(hf.CheckpointError, match=message) as err:
    hf.config_from_hf(str(tmp_path))
  assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
