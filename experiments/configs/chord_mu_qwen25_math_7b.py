"""CHORD on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#chord), the official
`examples/mix_chord/mix_chord.yaml` settings where this trainer has them (its model is Qwen2.5-7B-Instruct).

CHORD-mu as the paper (the example YAML's comments): no warm-up, mu from 0.9 to 0.05 over chord_mu.mu_decay = 0.4 of
train.steps (200 of 500), phi off. The example's own run (warm-up 200, decay 400, 0.5 -> 0.02, phi on):
--config.chord_mu.mu_warmup=0.4 --config.chord_mu.mu_decay=0.8 --config.chord_mu.mu_peak=0.5
--config.chord_mu.mu_valley=0.02 --config.chord_mu.phi=True.

  python -m trapo_jax.main --config=experiments/configs/chord_mu_qwen25_math_7b.py --workdir=gs://bucket/chord \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/chord_mu_qwen25_math_7b.py
"""

from experiments.configs import trapo_qwen25_math_7b


def get_config():
  c = trapo_qwen25_math_7b.get_config()  # the model's shapes, data and evaluation of the paper's run
  c.algo = "chord_mu"
  # 32 prompts x 8 rollouts = the official 256 usual experiences, + 2 demonstrations each = its 64 expert ones.
  c.train.batch_prompts = 32
  c.train.steps = 500  # guess: the official run's length is not published
  c.data.max_response_len = 10240  # official max_response_tokens (max_model_len 11264 with the 1024-token prompt)
  c.optim.lr = 1e-6  # guess: the example's trainer config (train_chord.yaml) is not in the repository
  return c
