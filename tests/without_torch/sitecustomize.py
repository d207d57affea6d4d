"""On PYTHONPATH of the processes the tests start (tests/helpers.py cpu_env): they see no torch, as a run installed
from requirements.txt sees none (torch is a dev requirement, for the comparisons with transformers). Where it is
installed, transformers imports it to read any model config (`hf.config_from_hf`), about 3 s of CPU a process."""

import sys

sys.modules.setdefault("torch", None)  # `import torch` fails; importlib.util.find_spec("torch") is None
