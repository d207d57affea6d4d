"""TRAPO on Qwen3-8B (thinking mode) with OpenR1-Math demonstrations.

  python -m trapo_jax.main --config=experiments/configs/trapo_qwen3_8b.py --workdir=runs/trapo_qwen3_8b \
      --config.model.hf_dir=/path/to/Qwen3-8B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/trapo_qwen3_8b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()
  c.model.hf_dir = ""  # set on the command line: a local Qwen3-8B (or Qwen3-8B-Base) directory
  # Shapes for compiling without weights; a run reads them from hf_dir's config.json. Qwen/Qwen3-8B's:
  # (rope_theta and max_position_embeddings, being set, override config.json's: they are the checkpoint's own.)
  c.model.model_type = "qwen3"
  c.model.vocab_size = 151936
  c.model.hidden_size = 4096
  c.model.intermediate_size = 12288
  c.model.num_layers = 36
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.rope_theta = 1000000.0
  c.model.rms_norm_eps = 1e-6
  c.model.qkv_bias = False
  c.model.qk_norm = True
  c.model.tie_embeddings = False
  c.model.max_position_embeddings = 40960
  # Qwen3's chat format in thinking mode: the assistant turn opens <think>, so expert prefixes (the thoughts of
  # the demonstrations) and rollouts are written inside the thinking block (trapo_jax/data/templates.py).
  c.data.template = "qwen3"
  c.eval.template = "qwen3"
  # Everything else is the 7B run (8 prompts x 8 samples, lr 1e-6, 1024 + 8192 tokens, evaluation at T=0.6,
  # top-p 1): a guess. Qwen3's model card recommends T=0.6, top-p 0.95, top-k 20 for thinking mode; the paper's
  # evaluation protocol is kept here so that results compare.
  # Evaluation 16 prompts x 32 samples a call: 144 KiB of bf16 KV cache a token (the 7B run's 56 KiB) leave the
  # 7B run's 32 prompts without room on a v5p-32; 16 is the fewest that fills its 16 batch shards.
  c.eval.batch_size = 16
  return c
