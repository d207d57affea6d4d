"""The decoder against Hugging Face transformers (PyTorch CPU) on random tiny configs, KV-cache decode, sharding."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trapo_jax import sharding  # noqa: E402
from trapo_jax.models import hf  # noqa: E402
from trapo_jax.models import transformer as tfm  # noqa: E402

CASES = {
    # GQA (4 query heads over 2 kv heads), q/k/v bias, untied head, head_dim != hidden/heads.
    "qwen2_gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)),
    # multi-head (no grouping), tied embeddings.
    "qwen2_mha_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
}


def _hf_model(model_type: str, extra: dict, seed: int = 0):
  torch.manual_seed(seed)
  common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, rms_norm_eps=1e-6,
                max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
  common.update(extra)
  cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.LlamaConfig
  model = transformers.AutoModelForCausalLM.from_config(cls(**common), dtype=torch.float32).eval()
  with torch.no_grad():
    # Random values everywhere (biases and norm scales too), so a swapped or transposed tensor cannot hide.
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
  return model


def _batch(vocab: int, b: int = 3, t: int = 9, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t))
  mask = np.ones((b, t), bool)
  mask[1, :3] = False  # left padding
  mask[2, :5] = False
  return tokens, mask


def _hf_logits(model, tokens, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(pos))
  return out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
  model_type, extra = CASES[request.param]
  model = _hf_model(model_type, extra)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("scan_layers, platform", [(True, ""), (False, ""), (True, "tpu")])
def test_logits_match_transformers(hf_case, scan_layers, platform):
  """Scanned or separate layers, projections of flat rows (CPU) or of [B, T, D] (as traced for TPU)."""
  model, path = hf_case
  cfg, params = hf.load_hf(path, scan_layers=scan_layers, platform=platform)
  tokens, mask = _batch(cfg.vocab_size)
  ours = np.asarray(jax.jit(lambda p: tfm.forward_logits(p, cfg, jnp.asarray(tokens), jnp.asarray(mask)))(params))
  ref = _hf_logits(model, tokens, mask)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(ours[mask].argmax(-1), ref[mask].argmax(-1))


def test_round_trip_through_save_hf(hf_case, tmp_path):
  model, path = hf_case
  cfg, params = hf.load_hf(path)
  out = str(tmp_path / "round_trip")
  hf.save_hf(out, cfg, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens, mask = _batch(cfg.vocab_size, seed=1)
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask), _hf_logits(model, tokens, mask))


def test_sharded_checkpoint_index(hf_case, tmp_path):
  model, path = hf_case
  cfg, params = hf.load_hf(path)
  out = str(tmp_path / "sharded")
  hf.save_hf(out, cfg, params, max_shard_bytes=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  cfg2, params2 = hf.load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _random_model(scan_layers=True, **kw):
  cfg = tfm.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, scan_layers=scan_layers, **kw)
  return cfg, nn.unbox(tfm.init_params(cfg, jax.random.key(0)))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decode_matches_full_forward(scan_layers):
  cfg, params = _random_model(scan_layers)
  tokens, mask = _batch(cfg.vocab_size, t=10)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  full = tfm.forward_logits(params, cfg, tokens, mask)
  positions = tfm.positions_from_mask(mask)
  # Prefill the first 4 slots at once, then one token at a time.
  cache = tfm.KVCache.zeros(cfg, tokens.shape[0], 12)
  apply = jax.jit(tfm.Decoder(cfg).apply)  # as the sampler runs it: one program per width, not one per operation
  hidden, cache = apply(params, tokens[:, :4], positions[:, :4], mask[:, :4], cache)
  steps = [hidden]
  for t in range(4, tokens.shape[1]):
    hidden, cache = apply(params, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(hidden)
  logits = jnp.einsum("btd,dv->btv", jnp.concatenate(steps, 1), tfm.unembed(params, cfg))
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(logits)[m], np.asarray(full)[m], atol=1e-4, rtol=0)
  assert int(cache.end) == tokens.shape[1]


def test_blockwise_attention_equals_dense():
  cfg, params = _random_model()
  tokens, mask = _batch(cfg.vocab_size, t=11)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  blocked = cfg.replace(attention_block=4)  # 11 tokens: blocks of 4, the last one padded
  f = lambda c: lambda p: tfm.forward_logits(p, c, tokens, mask)
  np.testing.assert_allclose(np.asarray(jax.jit(f(blocked))(params))[np.asarray(mask)],
                             np.asarray(jax.jit(f(cfg))(params))[np.asarray(mask)], atol=1e-5)
  loss = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(jnp.where(mask[..., None], f(c)(p), 0.0) ** 2)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), loss(blocked), loss(cfg))


def test_blockwise_prefill_into_a_cache_equals_dense():
  """A prefill longer than attention_block attends one block of queries at a time over the cache; its hidden states
  and cache are the dense prefill's, for a prefill from slot 0 and one that extends a filled cache (as the one-pass
  sampler's prefixes extend their prompt's)."""
  cfg, params = _random_model()
  tokens, mask = _batch(cfg.vocab_size, t=11)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  positions = tfm.positions_from_mask(mask)

  def prefill(c):
    cache = tfm.KVCache.zeros(c, tokens.shape[0], 16)
    first, cache = tfm.Decoder(c).apply(params, tokens[:, :5], positions[:, :5], mask[:, :5], cache, attend=5)
    rest, cache = tfm.Decoder(c).apply(params, tokens[:, 5:], positions[:, 5:], mask[:, 5:], cache, attend=11)
    return jnp.concatenate([first, rest], 1), cache

  (blocked, blocked_cache), (dense, dense_cache) = prefill(cfg.replace(attention_block=2)), prefill(cfg)
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(blocked)[m], np.asarray(dense)[m], rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), blocked_cache, dense_cache)
  # Both against the forward pass without a cache.
  full = np.asarray(tfm.forward(params, cfg, tokens, mask))
  np.testing.assert_allclose(np.asarray(blocked)[m], full[m], rtol=0, atol=1e-4)


def test_bf16_compute_close_to_fp32():
  cfg, params = _random_model(dtype="bfloat16")
  tokens, mask = _batch(cfg.vocab_size)
  lo = tfm.forward_logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
  hi = tfm.forward_logits(params, cfg.replace(dtype="float32"), jnp.asarray(tokens), jnp.asarray(mask))
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  err = float(jnp.abs(lo - hi)[np.asarray(mask)].max())
  assert 0 < err < 0.05


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_gradients(remat):
  cfg, params = _random_model()
  tokens, mask = _batch(cfg.vocab_size)
  loss = lambda c: jax.jit(jax.grad(lambda p: tfm.forward_logits(p, c, jnp.asarray(tokens), jnp.asarray(mask)).std()))
  g0, g1 = loss(cfg)(params), loss(cfg.replace(remat=remat))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def _two_axis_contractions(cfg, params, tokens, mask) -> int:
  """dot_generals contracting two axes at once (B and T) in the lowered gradient of a forward."""
  loss = lambda p: jnp.sum(tfm.forward(p, cfg, tokens, mask) ** 2)
  return jax.jit(jax.grad(loss)).lower(params).as_text().count("contracting_dims = [0, 1] x [0, 1]")


def test_projections_multiply_flat_rows_on_cpu_only():
  """On CPU every projection's weight gradient contracts one axis of rows [B*T] (tfm._project); traced for TPU the
  layers keep [B, T, D], and each of the scanned layer's 7 weight gradients contracts B and T."""
  cfg, params = _random_model()
  tokens, mask = (jnp.asarray(x) for x in _batch(cfg.vocab_size))
  assert jax.default_backend() == "cpu" and cfg.platform == ""
  assert _two_axis_contractions(cfg, params, tokens, mask) == 0
  assert _two_axis_contractions(cfg.replace(platform="tpu"), params, tokens, mask) == 7


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_projections_same_forward_and_gradients(dtype):
  """The flat rows of the CPU form change no value: logits and every gradient equal those of [B, T, D]."""
  cfg, params = _random_model(dtype=dtype)
  tokens, mask = (jnp.asarray(x) for x in _batch(cfg.vocab_size))
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: tfm.forward_logits(p, c, tokens, mask).std()))(params)
  (l0, g0), (l1, g1) = loss(cfg), loss(cfg.replace(platform="tpu"))
  tol = 1e-6 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(l0, l1, rtol=tol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), g0, g1)


def test_sharded_forward_equals_single_device():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(shape=(2, 2, 2))
  cfg = tfm.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, tie_embeddings=False)
  boxed = jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0)))
  shardings = sharding.logical_shardings(boxed, mesh)
  with sharding.activate(mesh):
    params = jax.jit(lambda: nn.unbox(tfm.init_params(cfg, jax.random.key(0))), out_shardings=shardings)()
  single = nn.unbox(tfm.init_params(cfg, jax.random.key(0)))
  q = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert len({s.data.shape for s in q.addressable_shards}) == 1
  assert q.addressable_shards[0].data.shape == (2, 16, 16)  # actually split, not replicated
  emb = params["params"]["embed"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  tokens, mask = _batch(cfg.vocab_size, b=4)
  batch = sharding.put_batch(mesh, {"t": tokens, "m": mask})
  with sharding.activate(mesh):
    sharded = jax.jit(lambda p, t, m: tfm.forward_logits(p, cfg, t, m))(params, batch["t"], batch["m"])
  ref = tfm.forward_logits(single, cfg, jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints: every failure names what is wrong.

def _saved_tiny(tmp_path):
  model = _hf_model(*CASES["qwen2_gqa"])
  path = tmp_path / "ckpt"
  model.save_pretrained(str(path))
  return model, path


def test_unsupported_model_type(tmp_path):
  _, path = _saved_tiny(tmp_path)
  cfg = json.load(open(path / "config.json"))
  cfg["model_type"] = "gpt2"
  json.dump(cfg, open(path / "config.json", "w"))
  with pytest.raises(hf.CheckpointError, match="model_type 'gpt2' is not supported"):
    hf.load_hf(str(path))


def test_missing_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json: file not found"):
    hf.load_hf(str(tmp_path))


def test_missing_tensor_named(tmp_path):
  from safetensors.torch import load_file, save_file
  _, path = _saved_tiny(tmp_path)
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf(str(path))


def test_shape_mismatch_named(tmp_path):
  from safetensors.torch import load_file, save_file
  _, path = _saved_tiny(tmp_path)
  tensors = load_file(str(path / "model.safetensors"))
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointError, match=r"k_proj\.weight has shape \(23, 32\), expected \(24, 32\)"):
    hf.load_hf(str(path))


def test_unexpected_tensor_named(tmp_path):
  from safetensors.torch import load_file, save_file
  _, path = _saved_tiny(tmp_path)
  tensors = load_file(str(path / "model.safetensors"))
  tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.o_proj\.bias"):
    hf.load_hf(str(path))


def test_no_safetensors(tmp_path):
  _, path = _saved_tiny(tmp_path)
  os.remove(path / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors file"):
    hf.load_hf(str(path))
