"""UFT on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#uft), the official `run.py` settings
where this trainer has them (its runs use Qwen2.5 0.5B-3B models with 1024-token responses).

  python -m trapo_jax.main --config=experiments/configs/uft_qwen25_math_7b.py --workdir=gs://bucket/uft \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-128, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"): its
rollout of 256 prompts x 4 rows over 16384 + 8192 slots holds 21 GiB of KV cache per chip, and the prefill of those
16k-token hinted contexts attends one block of queries at a time (models/transformer.py), 31 GiB per chip in all:

  python -m trapo_jax.main --mode=compile --topology=v5p-128 --config=experiments/configs/uft_qwen25_math_7b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()  # the model's shapes, data and evaluation of the paper's run
  c.algo = "uft"
  c.rollout.n = 4  # official n_rollouts
  c.train.batch_prompts = 256  # official train_batch_size; its 4 PPO mini-batches of 64 are one update here
  c.train.steps = 500  # official T; uft.hint_steps = 0.6 -> T_hint = 300
  c.optim.lr = 1e-6
  # guess: responses stay 8192 tokens long (official 1024 for its smaller models and data); the KL loss to the
  # reference policy (0.001) is not reproduced.
  return c
