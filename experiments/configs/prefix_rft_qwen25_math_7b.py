"""Prefix-RFT on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#prefix-rft). The official
repository ships its trainer defaults (`recipe/prefix_rft/config/prefix_rft_trainer.yaml`) but no run configuration:
everything else is a guess, as are the layout, schedule and entropy-mask defaults of the `prefix_rft` group
(docs/algorithm.md#prefix-rft); its `max_prompt_length` for prompt + prefix is data.max_prompt_len here
(`prefix_rft.prompt_budget`).

  python -m trapo_jax.main --config=experiments/configs/prefix_rft_qwen25_math_7b.py --workdir=gs://bucket/prefix \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-64, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"), with
the official placement, the prefix in the prompt's 1024-token budget: a one-pass rollout of 128 prompts x 8 rows over
1024 + 8192 slots (27.3 GiB per chip for its prefill, 36.7 for its decode) and responses of up to 9216 tokens in the
train step (18.9 GiB).

  python -m trapo_jax.main --mode=compile --topology=v5p-64 --config=experiments/configs/prefix_rft_qwen25_math_7b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()  # the model's shapes, data and evaluation of the paper's run
  c.algo = "prefix_rft"
  c.train.batch_prompts = 128  # guess
  c.train.steps = 500  # guess
  c.optim.lr = 1e-6  # trainer default
  c.optim.grad_clip = 1.0  # trainer default
  # prefix_rft.aggregation = "token_mean", the shipped YAML's loss_agg_mode (loss.seq_scale then plays no part).
  return c
