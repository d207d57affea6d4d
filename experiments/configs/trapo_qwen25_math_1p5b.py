"""TRAPO on Qwen2.5-Math-1.5B with OpenR1-Math demonstrations: the 7B recipe on the smaller model of the line.

  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_1p5b.py --workdir=runs/trapo_1p5b \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-1.5B --config.data.path=/path/to/openr1_train.parquet
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()
  c.model.hf_dir = ""  # set on the command line: a local Qwen2.5-Math-1.5B directory
  # Shapes for compiling without weights; a run reads them from hf_dir's config.json. Qwen2.5-Math-1.5B's config.json:
  # max_position_embeddings and rope_theta as public training docs quote it; 28 layers, 12/2 heads and tied
  # embeddings as the card of Qwen2.5-1.5B (its initialisation) states; vocab, hidden and MLP sizes from memory of
  # the config.json (the parameter count they give, 1.54B, is the card's).
  c.model.model_type = "qwen2"
  c.model.vocab_size = 151936
  c.model.hidden_size = 1536
  c.model.intermediate_size = 8960
  c.model.num_layers = 28
  c.model.num_heads = 12
  c.model.num_kv_heads = 2
  c.model.head_dim = 128
  c.model.rope_theta = 10000.0
  c.model.rms_norm_eps = 1e-6
  c.model.qkv_bias = True
  c.model.tie_embeddings = True
  # The checkpoint declares 4096 positions while prompt + response here is 9216 tokens, so loading it stops with a
  # line naming the fix. Guess: the 7B run's overrides (--config.model.rope_theta=40000
  # --config.model.max_position_embeddings=16384), or --config.data.max_response_len=3072 to stay inside 4096.
  c.model.max_position_embeddings = 4096
  # Everything else is the 7B run (the Qwen chat templates, 8 prompts x 8 samples, lr 1e-6): a guess, the paper
  # reports no separate 1.5B hyper-parameters.
  return c
