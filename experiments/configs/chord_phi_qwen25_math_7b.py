"""CHORD on Qwen2.5-Math-7B with OpenR1-Math demonstrations (docs/algorithm.md#chord), the official
`examples/mix_chord/mix_chord.yaml` settings where this trainer has them (its model is Qwen2.5-7B-Instruct).

CHORD-phi: mu = 0.1 throughout, demonstration tokens weighted by sg(p (1 - p)).

  python -m trapo_jax.main --config=experiments/configs/chord_phi_qwen25_math_7b.py --workdir=gs://bucket/chord \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/chord_phi_qwen25_math_7b.py
"""

from experiments.configs import chord_mu_qwen25_math_7b


def get_config():
  c = chord_mu_qwen25_math_7b.get_config()  # the same official example's batch, length and learning rate
  c.algo = "chord_phi"
  return c
