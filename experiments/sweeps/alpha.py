"""TrSFT's trust region alpha on the default task (0.1 is the official value)."""

SEEDS = (0, 1, 2)


def get_sweep():
  return [{"name": f"alpha{a}", "trapo.alpha": a} for a in (0.02, 0.1, 0.3, 1.0)]
