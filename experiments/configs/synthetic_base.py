"""The tiny base policy of the default experiment: SFT from random init on every level of the synthetic task.

Every level is in its data, so the policy knows the format of a long chain; what it lacks is accuracy per step, which
compounds: on the held-out split (temperature 0.6, 4 samples) it solves levels 1-6 55 / 49 / 36 / 28 / 28 / 15 % of
the time, so the hard levels (4-6) sit in the 5-30 % range where an expert prefix that writes some of the steps has
the most to teach. Stopped at 1250 steps, while those levels are still under 30 % (at 1500 steps level 4 reaches 33 %;
at 1000 all levels are lower, 41 / 34 / 25 / 18 / 15 / 13 %). The shipped weights are the step-1250 checkpoint of a
1500-step run of this config: the learning rate is constant after its warm-up and the data order does not depend on
`train.steps`, so the 1250-step run below trains the same steps. The base shipped before (SFT on levels 1-3 only)
wrote three steps whatever the level (407 of 408 level-4 samples), solved the hard levels 3-4 % of the time and no
method moved them (docs/results_v1.md).

Regenerate the shipped policy (trapo_jax/assets/synthetic_base) with:

  python -m trapo_jax.main --config=experiments/configs/synthetic_base.py --workdir=runs/synthetic_base
  python -m trapo_jax.main --config=experiments/configs/synthetic_base.py --workdir=runs/synthetic_base \
      --mode=export --export_dir=trapo_jax/assets/synthetic_base
"""

from experiments.configs import default
from trapo_jax.data import synthetic


def get_config():
  c = default.get_config()
  c.algo = "sft"
  c.model.hf_dir = ""  # random init of the sizes below
  c.model.model_type = "qwen2"
  c.model.vocab_size = 384
  c.model.hidden_size = 128
  c.model.intermediate_size = 512
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.rope_theta = 10000.0
  c.model.tie_embeddings = True
  c.model.max_position_embeddings = 512
  c.data.levels = synthetic.LEVELS
  c.train.steps = 1250
  c.train.batch_prompts = 16
  c.train.ckpt_every = 250
  # SFT updates with its own AdamW (sft.*, the run's betas, weight decay and clip): the shipped policy's 1e-3 with a
  # 100-step warm-up (0.08 x 1250) and a constant rate after it, not the official SFT's 5e-5 and cosine decay.
  c.sft.lr = 1e-3
  c.sft.warmup = 0.08
  c.sft.schedule = "constant"
  c.optim.weight_decay = 0.01
  c.eval.at_start = False
  c.eval.samples.synthetic = 4
  return c
