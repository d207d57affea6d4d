"""CHORD as Trinity-RFT's `examples/mix_chord/mix_chord.yaml` runs it (docs/algorithm.md#chord): mu warms up over
200 and decays over 400 steps (0.4 and 0.8 of a 500-step budget), from 0.5 to 0.02, with phi on. The paper's CHORD-mu
(`algo=chord_mu` alone) is warm-up 0, decay 200, 0.9 -> 0.05, phi off; this was chord_mu's schedule before."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "chord_mu"
  c.chord_mu.update(mu_warmup=0.4, mu_decay=0.8, mu_peak=0.5, mu_valley=0.02, phi=True)
  return c
