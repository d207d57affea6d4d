"""Hugging Face checkpoints <-> trapo_jax parameters (Qwen2 and Qwen2.5, Qwen3 dense, Llama 2 and 3.x).

Reads and writes `config.json` + `*.safetensors` (single file or sharded with `model.safetensors.index.json`),
so that `transformers.AutoModelForCausalLM.from_pretrained` loads what `save_hf` writes. Nothing loads partially:
a missing tensor, an unexpected one or a wrong shape is an error naming it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from trapo_jax import errors
from trapo_jax import paths
from trapo_jax.models import rope
from trapo_jax.models.transformer import ModelConfig

# The families this decoder implements, and what each fixes that a config.json does not state.
FAMILIES = {
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
    "llama": dict(qkv_bias=False, qk_norm=False),
}
# The transformers class of each family: config.json's `architectures`, which pipelines and serving stacks read.
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry; recomputed here
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")  # not needed by a tokenizer
# config.json fields of architectures this decoder does not have.
_MULTIMODAL = ("vision_config", "audio_config", "text_config")
_MOE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class CheckpointError(errors.UserError, ValueError):
  """A Hugging Face directory cannot be loaded exactly; the message names the file or tensor."""


def _read_json(path: str) -> dict:
  if not paths.exists(path):
    raise CheckpointError(f"{path}: file not found")
  return json.loads(paths.read_text(path))


def _refuse_unsupported(raw: dict, hf, path: str) -> None:
  """One line naming the config.json field of the first feature this decoder does not implement."""
  for key in ("attention_bias", "mlp_bias"):
    if raw["model_type"] != "qwen2" and raw.get(key):  # qwen2's q/k/v bias is implied by the family, not a field
      raise CheckpointError(f"{path}: {key}=true is not supported (no bias on attention or MLP projections)")
  if getattr(hf, "use_sliding_window", False):
    raise CheckpointError(f"{path}: use_sliding_window=true: sliding-window attention layers are not supported")
  for i, layer in enumerate(getattr(hf, "layer_types", None) or ()):
    if layer != "full_attention":
      raise CheckpointError(f"{path}: layer_types[{i}]={layer!r}: only full-attention layers are supported")
  if raw.get("dual_chunk_attention_config"):
    raise CheckpointError(f"{path}: dual_chunk_attention_config: dual chunk attention is not supported")
  if hf.hidden_act != "silu":
    raise CheckpointError(f"{path}: hidden_act {hf.hidden_act!r} is not supported (only silu)")


def config_from_hf(hf_dir: str, **overrides) -> ModelConfig:
  """ModelConfig from `<hf_dir>/config.json`; `overrides` sets compute options (dtype, remat, ...)."""
  path = paths.join(hf_dir, "config.json")
  raw = _read_json(path)
  for key in _MULTIMODAL:
    if raw.get(key) is not None:
      raise CheckpointError(f"{path}: {key}: multimodal configs are not supported (text-only decoders only)")
  for key in _MOE:
    if raw.get(key):
      raise CheckpointError(f"{path}: {key}={raw[key]}: mixture-of-experts models are not supported")
  model_type = raw.get("model_type")
  if model_type not in FAMILIES:
    raise CheckpointError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
  import transformers  # normalises fields across transformers versions (rope_theta vs rope_parameters, ...)
  try:
    hf = transformers.AutoConfig.for_model(**raw)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: not a valid {model_type} config: {e.args[0] if e.args else e}") from None
  _refuse_unsupported(raw, hf, path)
  params = dict(getattr(hf, "rope_parameters", None) or {})
  theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
  try:
    scaling = rope.from_hf(params, hf.max_position_embeddings)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  kwargs = dict(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
      num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, head_dim=head_dim, rope_theta=float(theta),
      rope_scaling=scaling, rms_norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings),
      max_position_embeddings=hf.max_position_embeddings, model_type=model_type, **FAMILIES[model_type])
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def _layout(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, bool, tuple[int, ...]]]:
  """(HF tensor name, path in the stacked param tree, layer or None, transposed?, HF shape) for every weight."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  yield "model.embed_tokens.weight", ("embed", "embedding"), None, False, (cfg.vocab_size, d)
  yield "model.norm.weight", ("norm", "scale"), None, False, (d,)
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), None, True, (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    yield pre + "input_layernorm.weight", ("layers", "input_layernorm", "scale"), i, False, (d,)
    yield pre + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "scale"), i, False, (d,)
    for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
      yield pre + f"self_attn.{name}.weight", ("layers", "self_attn", name, "kernel"), i, True, (out, d)
      if cfg.qkv_bias:
        yield pre + f"self_attn.{name}.bias", ("layers", "self_attn", name, "bias"), i, False, (out,)
    if cfg.qk_norm:
      yield pre + "self_attn.q_norm.weight", ("layers", "self_attn", "q_norm", "scale"), i, False, (hd,)
      yield pre + "self_attn.k_norm.weight", ("layers", "self_attn", "k_norm", "scale"), i, False, (hd,)
    yield pre + "self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), i, True, (d, q)
    yield pre + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), i, True, (f, d)
    yield pre + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), i, True, (f, d)
    yield pre + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), i, True, (d, f)


def _weight_files(hf_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file (as named under hf_dir: local or gs://)."""
  index = paths.join(hf_dir, "model.safetensors.index.json")
  if paths.exists(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no weight_map")
    return {k: paths.join(hf_dir, v) for k, v in weight_map.items()}
  files = [f for f in paths.listdir(hf_dir) if f.endswith(".safetensors")]
  if not files:
    raise CheckpointError(f"{hf_dir}: no *.safetensors file (only safetensors checkpoints are read)")
  from safetensors import safe_open
  names = {}
  for fname in files:
    with safe_open(paths.local_copy(paths.join(hf_dir, fname)), framework="flax") as f:
      for k in f.keys():
        names[k] = paths.join(hf_dir, fname)
  return names


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _cpu_device():
  """This process's own CPU device: under the multi-process CPU backend `jax.devices("cpu")[0]` is process 0's,
  which the other processes cannot read back."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def load_hf(hf_dir: str, **overrides) -> tuple[ModelConfig, dict]:
  """An HF directory (local or gs://) -> (ModelConfig, host params {"params": ...}) in `param_dtype`, layers stacked or not
  as `scan_layers` says. Place them on a mesh with `sharding.put_global`."""
  from safetensors import safe_open
  cfg = config_from_hf(hf_dir, **overrides)
  files = _weight_files(hf_dir)
  layout = list(_layout(cfg))
  expected = {name for name, *_ in layout}
  unexpected = sorted(k for k in files if k not in expected and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise CheckpointError(f"{hf_dir}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for {cfg.model_type}")
  missing = [name for name in sorted(expected) if name not in files]
  if missing:
    raise CheckpointError(f"{hf_dir}: missing tensor {missing[0]} ({len(missing)} missing in all)")
  dtype = jnp.dtype(cfg.param_dtype)
  stacked: dict[tuple[str, ...], np.ndarray] = {}
  params: dict = {}
  handles = {}
  cpu = _cpu_device()
  try:
    for name, path, layer, transpose, shape in layout:
      fname = files[name]
      if fname not in handles:
        handles[fname] = safe_open(paths.local_copy(fname), framework="flax").__enter__()  # safetensors reads a file
      with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
        t = handles[fname].get_tensor(name)
        got = tuple(t.shape)
        if got != shape:
          raise CheckpointError(f"{fname}: tensor {name} has shape {got}, expected {shape}")
        t = np.asarray((t.T if transpose else t).astype(dtype))
      if layer is None:
        _set(params, path, t)
      else:
        buf = stacked.get(path)
        if buf is None:
          buf = stacked[path] = np.empty((cfg.num_layers,) + t.shape, t.dtype)
        buf[layer] = t
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  for path, buf in stacked.items():
    _set(params, path, buf)
  params = {"params": params}
  return cfg, (params if cfg.scan_layers else unstack_layers(params, cfg.num_layers))


def unstack_layers(params: dict, num_layers: int) -> dict:
  """{"layers": stacked} -> {"layers_0": ..., "layers_1": ...} (the loop layout)."""
  p = dict(params["params"])
  stacked = p.pop("layers")
  for i in range(num_layers):
    p[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return {"params": p}


def stack_layers(params: dict, num_layers: int) -> dict:
  p = dict(params["params"])
  if "layers" in p:
    return params
  layers = [p.pop(f"layers_{i}") for i in range(num_layers)]
  p["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return {"params": p}


def hf_config_dict(cfg: ModelConfig, **extra) -> dict:
  import transformers
  family = FAMILIES.get(cfg.model_type)
  if family is None:
    raise CheckpointError(f"model_type {cfg.model_type!r} has no Hugging Face export (known: {', '.join(FAMILIES)})")
  for key, value in family.items():
    if getattr(cfg, key) != value:
      raise CheckpointError(f"{cfg.model_type} has {key}={value} in Hugging Face, this model {key}="
                            f"{getattr(cfg, key)}; pick the model_type of its architecture ({', '.join(FAMILIES)})")
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
      rope_parameters=rope.to_hf(cfg.rope_scaling, cfg.rope_theta), dtype=cfg.param_dtype,
      architectures=[ARCHITECTURES[cfg.model_type]], **extra)
  if cfg.model_type == "qwen2":
    hf = transformers.Qwen2Config(**common)
  elif cfg.model_type == "qwen3":
    hf = transformers.Qwen3Config(attention_bias=False, **common)
  else:
    hf = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
  return hf.to_dict()


def special_token_ids(tokenizer) -> dict[str, int]:
  """eos/pad/bos ids for config.json and generation_config.json: pad defaults to eos, as in training."""
  if tokenizer.eos_token_id is None:
    raise CheckpointError("the tokenizer has no eos token: generation could not stop")
  ids = {"eos_token_id": int(tokenizer.eos_token_id),
         "pad_token_id": int(tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)}
  if tokenizer.bos_token_id is not None:
    ids["bos_token_id"] = int(tokenizer.bos_token_id)
  return ids


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def save_hf(path: str, cfg: ModelConfig, params: Any, *, max_shard_bytes: int = 5 * 2**30,
            tokenizer=None, chat_template: str | None = None, **config_extra) -> None:
  """Write params as a Hugging Face directory (config.json, safetensors shards + index when large).

  With a tokenizer, its files and its eos/pad/bos ids go along (config.json and generation_config.json), so that
  transformers' `generate()` stops at EOS; `chat_template` (Jinja) goes into its tokenizer_config.json, so that
  `apply_chat_template` writes the prompt the policy was trained on. A gs:// directory is written locally
  first, then uploaded file by file.
  """
  if paths.is_remote(path):
    with tempfile.TemporaryDirectory() as local:
      save_hf(local, cfg, params, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer, **config_extra)
      paths.upload_dir(local, path)
    return
  from safetensors.flax import save_file
  os.makedirs(path, exist_ok=True)
  if tokenizer is not None:
    config_extra = {**special_token_ids(tokenizer), **config_extra}
  params = jax.device_get(params)
  params = stack_layers(params if "params" in params else {"params": params}, cfg.num_layers)["params"]
  tensors: dict[str, np.ndarray] = {}
  for name, tree_path, layer, transpose, _ in _layout(cfg):
    t = np.asarray(_get(params, tree_path))
    if layer is not None:
      t = t[layer]
    tensors[name] = np.ascontiguousarray(t.T if transpose else t)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if size and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  cpu = _cpu_device()

  def write(shard, fname):
    with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
      save_file({k: jnp.asarray(v) for k, v in shard.items()}, os.path.join(path, fname), metadata={"format": "pt"})
    os.chmod(os.path.join(path, fname), 0o666 & ~_umask())  # safetensors creates its files 0600

  if len(shards) == 1:
    write(shards[0], "model.safetensors")
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write(shard, fname)
      weight_map.update({k: fname for k in shard})
    paths.write(os.path.join(path, "model.safetensors.index.json"), json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, indent=2))
  hf_cfg = hf_config_dict(cfg, **config_extra)
  paths.write(os.path.join(path, "config.json"), json.dumps(hf_cfg, indent=2))
  if tokenizer is not None:
    import transformers
    ids = {k: hf_cfg[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if hf_cfg.get(k) is not None}
    transformers.GenerationConfig(**ids).save_pretrained(path)
    if chat_template is not None:
      tokenizer = copy.copy(tokenizer)  # the run's tokenizer keeps its own template
      tokenizer.chat_template = chat_template
    # In tokenizer_config.json (not chat_template.jinja): where every transformers version and serving stack reads it.
    tokenizer.save_pretrained(path, save_jinja_files=False)


def load_tokenizer(path: str):
  """A tokenizer from a directory, local or gs:// (no network; from gs://, its files other than weights are copied
  into the local cache first)."""
  import transformers
  if not paths.isdir(path):
    raise CheckpointError(f"{path}: tokenizer directory not found")
  if paths.is_remote(path):
    path = paths.local_dir(path, [n for n in paths.listdir(path) if not n.endswith(_WEIGHT_SUFFIXES)])
  if _tokenizer_class(path) == transformers.TokenizersBackend.__name__:
    # The class AutoTokenizer would pick, without its model-config machinery: that imports torch when it is installed
    # (3-4 s of every run's start, for a tokenizer that never needs it).
    return transformers.TokenizersBackend.from_pretrained(path, local_files_only=True)
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def _tokenizer_class(path: str) -> str | None:
  """The class a local tokenizer directory names in its tokenizer_config.json; None where it names none or the file
  does not read (AutoTokenizer then decides, and reports a broken file)."""
  try:
    return _read_json(paths.join(path, "tokenizer_config.json")).get("tokenizer_class")
  except (CheckpointError, ValueError, AttributeError):
    return None
