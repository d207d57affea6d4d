"""The embedded default: TRAPO on the synthetic reasoning task with the tiny shipped base policy, CPU, minutes."""

from trapo_jax import config as config_lib
from trapo_jax.data import synthetic


def get_config():
  c = config_lib.base_config()
  c.algo = "trapo"
  c.model.hf_dir = synthetic.BASE_POLICY_DIR
  c.model.tokenizer_dir = synthetic.TOKENIZER_DIR
  c.mesh.fsdp = -1
  c.data.source = "synthetic"
  c.data.max_prompt_len = 96
  c.data.max_response_len = 96
  c.data.template = "train"
  c.train.steps = 60
  c.train.batch_prompts = 8
  c.train.ckpt_every = 20
  c.train.micro_batch_tokens = 1 << 16
  c.train.logprob_chunk = 128
  # Tiny models need a larger step than 7B ones; everything else is the official run (docs/algorithm.md).
  c.optim.lr = 1e-4
  c.eval.benchmarks = ("synthetic",)
  c.eval.samples.synthetic = 4
  c.eval.max_new_tokens = 96
  c.eval.template = "train"
  c.eval.temperature = 0.6
  c.eval.batch_size = 64
  c.eval.at_start = True
  return c
