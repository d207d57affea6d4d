"""SRFT on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#srft), the settings of the HPT
repository's `exp_scripts/train_srft.sh` (SRFT publishes none) where this trainer has them.

  python -m trapo_jax.main --config=experiments/configs/srft_qwen25_math_7b.py --workdir=gs://bucket/srft \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/srft_qwen25_math_7b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()  # the model's shapes, data and evaluation of the paper's run
  c.algo = "srft"
  c.train.batch_prompts = 128  # official train_batch_size, in 2 mini-batches of 64 (srft.mini_batches = 2)
  # The official actor sums a GPU's K dynamic micro-batches (ppo_max_token_len_per_gpu 32k over its 64 sequences of a
  # mini-batch): K = ceil(64 x mean sequence length / 32768), 4 to 8 at 2k to 4k tokens; 8 (a power of two, so the
  # 512 rows of a mini-batch split over the batch shards) for the long responses of Qwen2.5-Math's runs.
  c.srft.micro_batches = 8
  c.train.steps = 500  # official total_training_steps
  # sum / (8192 x 8 GPUs) over a mini-batch's 512 sequences, as the official normaliser: the sequences a GPU holds in
  # one micro-batch (64 / K), as the micro-batches' losses add up.
  c.loss.seq_scale = 8.0
  c.optim.lr = 1e-6  # official LR
  return c
