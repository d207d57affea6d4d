"""Prompt templates (docs/algorithm.md#evaluation).

- `train`: the training prompt of the official dataset (`our_get_prompt_text`), system turn included.
- `eval`: the training prompt without the system turn.
- `eval_official`: the official evaluation's `simplerl` string byte for byte. It keeps the system turn (the official
  evaluation drops the system message of the data file, then this template writes its own) and its typo
  `within\\boxed{{}}`: no space and literal double braces, because the official string is a plain concatenation,
  not an f-string.
- `qwen3`: Qwen3's chat format in thinking mode (its own template adds no system turn), with the assistant turn
  opened by `<think>\\n`. Qwen3's chat template ends the prompt at `<|im_start|>assistant\\n` and the model writes
  `<think>` itself; opening the block here puts an expert prefix (the thought of a demonstration, tags stripped, §2)
  inside the thinking block, where Qwen3 writes its reasoning. A rollout closes it with `</think>` and answers.
- `qwen3_no_think`: what Qwen3's chat template writes with `enable_thinking=False`: an empty thinking block, so the
  model answers at once.
- `llama3`: the Llama 3 chat format (Llama 3.x instruct checkpoints; base checkpoints know its special tokens). The
  prompt opens with `<|begin_of_text|>` because prompts are tokenised without added special tokens.

Substitution is by `str.replace` on `{problem}`, so literal braces in a template or in a problem survive.
"""

from __future__ import annotations

_PLACEHOLDER = "{problem}"
_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_USER = "<|im_start|>user\n" + _PLACEHOLDER
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"

TEMPLATES: dict[str, str] = {
    "train": _SYSTEM + _USER + _INSTRUCTION + _ASSISTANT,
    "eval": _USER + _INSTRUCTION + _ASSISTANT,
    "eval_official": _SYSTEM + _USER + "\nPlease reason step by step, and put your final answer within\\boxed{{}}."
                     + _ASSISTANT,
    "qwen3": _USER + _INSTRUCTION + _ASSISTANT + "<think>\n",
    "qwen3_no_think": _USER + _INSTRUCTION + _ASSISTANT + "<think>\n\n</think>\n\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + _PLACEHOLDER + _INSTRUCTION
              + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


def format_prompt(problem: str, template: str) -> str:
  """The prompt text for `problem` under the template named `template`."""
  if template not in TEMPLATES:
    raise ValueError(f"template {template!r} is unknown (known: {', '.join(TEMPLATES)})")
  return TEMPLATES[template].replace(_PLACEHOLDER, problem, 1)


def chat_template(template: str) -> str:
  """The template named `template` as a Hugging Face chat template (Jinja): the conversation's last message is the
  problem, and the result is format_prompt's text, assistant turn opened, whatever `add_generation_prompt` says (the
  policy was trained to answer right there). The template's own text is kept verbatim by `{% raw %}`."""
  before, after = format_prompt("\0", template).split("\0", 1)
  raw = lambda text: "{% raw %}" + text + "{% endraw %}" if text else ""
  return raw(before) + "{{ messages[-1]['content'] }}" + raw(after)


def opens_think(template: str) -> bool:
  """Whether the prompt under `template` already opens the thought ("<think>\n" at its end): a demonstration that
  starts with one then continues it instead of repeating it."""
  return format_prompt("", template).endswith("<think>\n")
