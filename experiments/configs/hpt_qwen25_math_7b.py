"""HPT on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#hpt), the official
`exp_scripts/train.sh` settings where this trainer has them.

  python -m trapo_jax.main --config=experiments/configs/hpt_qwen25_math_7b.py --workdir=gs://bucket/hpt \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth, the train step summing its 8 micro-batches of 64
rows in each of 2 mini-batches (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/hpt_qwen25_math_7b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()  # the model's shapes, data and evaluation of the paper's run
  c.algo = "hpt"
  c.train.batch_prompts = 128  # official train_batch_size, in 2 mini-batches of 64 (hpt.mini_batches = 2)
  # The official actor sums a GPU's K dynamic micro-batches (ppo_max_token_len_per_gpu 32k over its 64 sequences of a
  # mini-batch): K = ceil(64 x mean sequence length / 32768), 4 to 8 at 2k to 4k tokens; 8 (a power of two, so the
  # 512 rows of a mini-batch split over the batch shards) for the long responses of Qwen2.5-Math's runs.
  c.hpt.micro_batches = 8
  c.train.steps = 500  # official total_training_steps
  # sum / (8192 x 8 GPUs) over a mini-batch's 512 sequences, as the official normaliser: the sequences a GPU holds in
  # one micro-batch (64 / K), as the micro-batches' losses add up.
  c.loss.seq_scale = 8.0
  c.optim.lr = 5e-6  # official LR
  c.optim.grad_clip = 1.0  # official; its max_grad_norm=80 (skip larger updates) is not reproduced
  # hpt.gate = 0, hpt.sft_coef = 1.0: official SWITCH_GATE and SFT_LOSS_COEF for the 7B model.
  return c
