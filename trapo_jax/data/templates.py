"""Prompt templates (docs/trapo_spec.md §3, §6.12).

- `train`: the training prompt of the official dataset (`our_get_prompt_text`), system turn included.
- `eval`: the training prompt without the system turn.
- `eval_official`: the official evaluation's `simplerl` string byte for byte. It keeps the system turn (the official
  evaluation drops the system message of the data file, then this template writes its own) and its typo
  `within\\boxed{{}}`: no space and literal double braces, because the official string is a plain concatenation,
  not an f-string.

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
}


def format_prompt(problem: str, template: str) -> str:
  """The prompt text for `problem` under the template named `template`."""
  if template not in TEMPLATES:
    raise ValueError(f"template {template!r} is unknown (known: {', '.join(TEMPLATES)})")
  return TEMPLATES[template].replace(_PLACEHOLDER, problem, 1)


def opens_think(template: str) -> bool:
  """Whether the prompt under `template` already opens the thought ("<think>\n" at its end): a demonstration that
  starts with one then continues it instead of repeating it."""
  return format_prompt("", template).endswith("<think>\n")
