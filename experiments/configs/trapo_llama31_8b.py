"""TRAPO on Llama-3.1-8B (or -Instruct: the same shapes) with OpenR1-Math demonstrations, Llama 3 chat format.

  python -m trapo_jax.main --config=experiments/configs/trapo_llama31_8b.py --workdir=runs/trapo_llama31_8b \
      --config.model.hf_dir=/path/to/Llama-3.1-8B-Instruct --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/trapo_llama31_8b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()
  c.model.hf_dir = ""  # set on the command line: a local Llama-3.1-8B(-Instruct) directory
  # Shapes for compiling without weights; a run reads them from hf_dir's config.json. meta-llama/Llama-3.1-8B's:
  # (rope_theta and max_position_embeddings, being set, override config.json's: they are the checkpoint's own.)
  c.model.model_type = "llama"
  c.model.vocab_size = 128256
  c.model.hidden_size = 4096
  c.model.intermediate_size = 14336
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.rope_theta = 500000.0
  c.model.rope_scaling.rope_type = "llama3"
  c.model.rope_scaling.factor = 8.0
  c.model.rope_scaling.low_freq_factor = 1.0
  c.model.rope_scaling.high_freq_factor = 4.0
  c.model.rope_scaling.original_max_position_embeddings = 8192
  c.model.rms_norm_eps = 1e-5
  c.model.qkv_bias = False
  c.model.tie_embeddings = False
  c.model.max_position_embeddings = 131072
  # The Llama 3 chat format for training and evaluation. Guess: the compared papers' exact Llama prompt is not
  # known here; the instruction line is the Qwen runs'. Rows end with the tokenizer's eos token (-Instruct:
  # <|eot_id|>, base: <|end_of_text|>).
  c.data.template = "llama3"
  c.eval.template = "llama3"
  # Everything else is the 7B run (8 prompts x 8 samples, lr 1e-6, 1024 + 8192 tokens): a guess.
  # Evaluation 16 prompts x 32 samples a call: 128 KiB of bf16 KV cache a token (the 7B run's 56 KiB) leave the
  # 7B run's 32 prompts without room on a v5p-32; 16 is the fewest that fills its 16 batch shards.
  c.eval.batch_size = 16
  return c
