"""The tiny base policy of the default experiment: SFT from random init on the EASY levels of the synthetic task.

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
  c.data.levels = synthetic.EASY_LEVELS
  c.train.steps = 1500
  c.train.batch_prompts = 16
  c.train.ckpt_every = 250
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.01
  c.eval.at_start = False
  c.eval.samples.synthetic = 4
  return c
