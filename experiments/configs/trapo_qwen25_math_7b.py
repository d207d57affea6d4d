"""The paper's main run (docs/algorithm.md#trapo): TRAPO on Qwen2.5-Math-7B with OpenR1-Math demonstrations.

  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_7b.py --mode=compile --topology=v5p-32
  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_7b.py --workdir=gs://bucket/run1 \
      --config.model.hf_dir=/path/to/Qwen2.5-Math-7B --config.data.path=/path/to/openr1_train.parquet

The model is the official run's: the stock Qwen2.5-Math-7B checkpoint (4096 positions, RoPE base 10000) with the 16k
context and RoPE base 40000 that the LUFFY/HPT/ReLIFT training scripts give it, since a sequence here is 1024 + 8192
tokens. This config sets both (model.rope_theta, model.max_position_embeddings), so they override the checkpoint's
config.json; without them loading that checkpoint stops with a line naming them.

Slice: a v5p-32, where every program of the run fits at full depth (docs/performance.md, "TPU, compiled here"):

  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=experiments/configs/trapo_qwen25_math_7b.py
"""

from trapo_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.algo = "trapo"
  c.model.hf_dir = ""  # set on the command line: a local Qwen2.5-Math-7B directory
  # The model's shapes, so that the config compiles without weights (--mode=compile); a run reads them from
  # hf_dir's config.json instead. Qwen2.5-Math-7B's config.json:
  c.model.model_type = "qwen2"
  c.model.vocab_size = 152064
  c.model.hidden_size = 3584
  c.model.intermediate_size = 18944
  c.model.num_layers = 28
  c.model.num_heads = 28
  c.model.num_kv_heads = 4
  c.model.head_dim = 128
  c.model.rope_theta = 40000.0  # the official scripts' value; overrides the checkpoint's 10000
  c.model.rms_norm_eps = 1e-6
  c.model.qkv_bias = True
  c.model.tie_embeddings = False
  c.model.max_position_embeddings = 16384  # the official scripts' value; overrides the checkpoint's 4096
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"  # gradient checkpointing, as the official FSDP run
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.source = "demos"
  c.data.path = ""  # set on the command line: OpenR1 layout parquet/jsonl with >= 2 R1 solutions per problem
  c.data.max_prompt_len = 1024
  c.data.max_response_len = 8192
  c.data.template = "train"
  # 8 prompts x 8 samples (4+2+1+1), one AdamW step per batch; the other rollout/loss keys keep their
  # official defaults from trapo_jax.config (T=1.0, alpha=0.1, entropy 0.001, sum / (8192 * 8)).
  c.train.batch_prompts = 8
  c.train.steps = 500
  c.train.micro_batch_tokens = 32768  # per device, as ppo_max_token_len_per_gpu
  c.train.logprob_chunk = 1024
  c.train.ckpt_every = 50
  c.optim.lr = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.eval.at_end = True
  # 32 prompts x 32 samples a call: the KV cache of 64 x 32 x 9216 slots (63 GiB per chip on a v5p-32) does not fit
  # the decode; the batch changes only how the 600 problems are grouped (docs/performance.md, "TPU, compiled here").
  c.eval.batch_size = 32
  return c
