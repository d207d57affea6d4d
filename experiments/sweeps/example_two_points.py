"""Two very short points on the tiny default model: a smoke test of the sweep tooling."""

COMMON = {
    "train.steps": 2,
    "train.batch_prompts": 2,
    "eval.max_problems": 8,
    "eval.samples.synthetic": 1,
    "eval.at_start": False,
    # A step's stages sampled in one decode pass, as GPU/TPU runs sample them: fewer programs to compile on a CPU.
    "rollout.one_pass": True,
}


def get_sweep():
  return [{"name": "trapo"}, {"name": "grpo", "algo": "grpo"}]
