"""Math answer grading: the training reward and the evaluation grader (docs/algorithm.md#evaluation).

`grade` is the official evaluation's two-stage check:
  1. math-verify: `verify(parse("$" + answer + "$"), parse(response))` on the response (its last
     `MAX_PARSE_CHARS` characters), no think-format check. This alone is the official training reward
     (`fallback=False`).
  2. if that says no (or raises): the last `\\boxed{}` / `\\fbox{}` of the response against the answer after
     MATH-style string normalisation (the official evaluation's second grader, OAT's `boxed_reward_fn` with
     `fast=False`): equal strings, equal exact numbers, else symbolic equivalence of the two normalised texts
     (math-verify's LaTeX parser into sympy, under the same timeouts). It never evaluates model text.

`grade_batch` runs `grade` in worker processes. math-verify bounds its own work with `signal.alarm`, which only
works in a process's main thread and cannot interrupt a long call into C (a regex, a big-integer operation), so
each item also gets a wall-clock deadline enforced from the parent: past it the worker is killed and replaced and
the item scores 0. `grade` called off the main thread (where no alarm can fire) grades in that pool too.
Workers are started through a forkserver (or spawn), never a plain fork, so the caller may already run JAX threads.
The pool stays alive between calls; `close()` stops it (it is also stopped at interpreter exit).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import fractions
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from typing import Callable, Sequence

import math_verify
from math_verify.errors import TimeoutException

# math-verify tries every match in the text, so a 1 MB response can cost many seconds (`\boxed{1}` x 100k: 15 s).
# The graded answer is at the end (it takes the rightmost match first), and a response of 8192 tokens is ~40k
# characters, so only this many trailing characters are parsed: real responses are parsed whole, hostile ones by
# their tail.
MAX_PARSE_CHARS = 65_536
# Reference answers are at most a few hundred characters; a longer boxed text is not an answer worth normalising
# (and the normaliser's regexes are quadratic in the worst case).
MAX_BOXED_CHARS = 1_000
# Plain decimals/fractions longer than this are left as strings (exact rational arithmetic on them is not needed).
_MAX_NUMBER_CHARS = 64
_WORKER_START_TIMEOUT_S = 120.0

GradeFn = Callable[..., float]


def grade(response: str, answer: str, *, timeout_s: int = 5, fallback: bool = True) -> float:
  """1.0 if `response` answers `answer` (math-verify, then the boxed fallback), else 0.0.

  timeout_s: math-verify's own limit per parse/comparison, whole seconds. It is signal-based, so it only works in a
    process's main thread: called from another thread, `grade` runs in the worker pool of `grade_batch` instead,
    under a wall-clock deadline of 3 x timeout_s (and scores 0 past it).
  fallback: also try the boxed grader (official evaluation); False gives the official training reward.
  """
  if not _on_main_thread():
    return grade_batch([response], [answer], timeout_s=3 * timeout_s, workers=1, fallback=fallback)[0]
  if _math_verify_correct(response, answer, timeout_s):
    return 1.0
  return boxed_fallback(response, answer, timeout_s=timeout_s) if fallback else 0.0


def _on_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _math_verify_correct(response: str, answer: str, timeout_s: int) -> bool:
  try:
    gold = _parsed_answer(answer, timeout_s)
    pred = math_verify.parse(response[-MAX_PARSE_CHARS:], parsing_timeout=timeout_s)
    return bool(math_verify.verify(gold, pred, timeout_seconds=timeout_s))
  except (Exception, TimeoutException):  # math-verify's TimeoutException is a BaseException
    return False


@functools.lru_cache(maxsize=4096)
def _parsed_answer(answer: str, timeout_s: int) -> list:
  """math-verify's parse of a reference answer, kept per process: a step grades each prompt's answer against all of
  its rollouts (8 in the official run) in the same few workers, and parsing the answer costs more than parsing a
  short response (all six benchmarks' answers: 8.1 s against 4.1 s for their boxed responses). A parse that raises
  or times out is not kept."""
  return math_verify.parse("$" + answer + "$", parsing_timeout=timeout_s)


# --- boxed fallback ---------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` (braces matched, `\\{` `\\}` skipped), or `\\boxed x`.

  None if there is none or the last one is never closed (a truncated answer is no answer).
  """
  start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
  if start < 0:
    return None
  i = start + len(command)
  if text.startswith(" ", i):  # `\boxed 5`: the argument is the next token
    token = re.match(r" +([^\s$]+)", text[i:i + MAX_BOXED_CHARS])
    return token.group(1) if token else None
  if not text.startswith("{", i):
    return None
  depth = 0
  for brace in re.finditer(r"\\.|[{}]", text[i:], flags=re.DOTALL):
    if brace.group() == "{":
      depth += 1
    elif brace.group() == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:i + brace.start()]
  return None


def _fix_fracs(s: str) -> str:
  r"""`\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`, `\frac{a}b` -> `\frac{a}{b}`."""
  s = re.sub(r"\\frac([^{\\])", r"\\frac{\1}", s)
  return re.sub(r"(\\frac\{[^{}]*\})([^{\\])", r"\1{\2}", s)


def _strip_text_wrappers(s: str) -> str:
  wrapped = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\{(.*)\}", s)
  return wrapped.group(1).strip() if wrapped else s


def normalize_answer(s: str) -> str:
  """MATH-style ("hendrycks") normalisation of an answer string, for exact string comparison."""
  s = _strip_text_wrappers(s.strip())
  s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
  s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
  s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
  without_unit = re.sub(r"\\(?:text|mbox)\{[^{}]*\}\s*(\^\{?\d\}?)?$", "", s).strip()
  if without_unit:  # `5\text{ cm}` -> `5`, but a lone `\text{yes}` stays
    s = without_unit
  s = s.replace("{,}", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", "")
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  parts = s.split("=")
  if len(parts) == 2 and len(parts[0].strip()) <= 2:  # `x = 3` -> `3`
    s = parts[1]
  s = re.sub(r"\\sqrt([^{\\\s])", r"\\sqrt{\1}", s)
  s = s.replace(" ", "")
  s = _fix_fracs(s)
  s = s.rstrip(".")
  if s.startswith("."):
    s = "0" + s
  if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):  # 1,000 -> 1000
    s = s.replace(",", "")
  s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice `(B)` -> `B`
  s = re.sub(r"^\\text\{\(?([A-Za-z])\)?\}$", r"\1", s)
  simple_fraction = re.fullmatch(r"(-?\d+)/(\d+)", s)
  if simple_fraction:
    s = "\\frac{%s}{%s}" % simple_fraction.groups()
  return s


def _as_number(s: str) -> fractions.Fraction | None:
  r"""An exact value for a plain integer/decimal or `\frac{int}{int}` (signed), else None."""
  if len(s) > _MAX_NUMBER_CHARS:
    return None
  m = re.fullmatch(r"([+-]?)\\frac\{(\d+)\}\{(\d+)\}", s)
  if m:
    sign, num, den = m.groups()
    if int(den) == 0:
      return None
    value = fractions.Fraction(int(num), int(den))
    return -value if sign == "-" else value
  if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", s):
    return fractions.Fraction(s)
  return None


def answers_match(given: str, reference: str) -> bool:
  """Normalised string equality, exact numeric equality, or case-insensitive equality of words."""
  a, b = normalize_answer(given), normalize_answer(reference)
  if not a:
    return False
  if a == b:
    return True
  x, y = _as_number(a), _as_number(b)
  if x is not None and y is not None:
    return x == y
  return a.isalpha() and a.lower() == b.lower()


def symbolically_equal(given: str, reference: str, timeout_s: int = 5) -> bool:
  r"""Whether two answers are the same mathematical object after normalisation: `2\sqrt{2}` and `\sqrt{8}`,
  `[\frac{1}{2}, 3)` and `[0.5, 3)`, `\{1, \sqrt{4}\}` and `\{2, 1\}`.

  Parsed by math-verify's LaTeX parser (latex2sympy, no `eval`) and compared by its `verify`, each step limited to
  timeout_s seconds; that limit is a signal, so off the main thread nothing is tried (False).
  """
  a, b = normalize_answer(given), normalize_answer(reference)
  if not a or not b or not _on_main_thread():
    return False
  latex = [math_verify.LatexExtractionConfig()]
  try:
    gold = math_verify.parse("$" + b + "$", extraction_config=latex, parsing_timeout=timeout_s)
    pred = math_verify.parse("$" + a + "$", extraction_config=latex, parsing_timeout=timeout_s)
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=timeout_s))
  except (Exception, TimeoutException):
    return False


def boxed_fallback(response: str, answer: str, *, timeout_s: int = 5) -> float:
  """1.0 if the last boxed text of `response` matches `answer` (OAT's boxed grader with fast=False): equal after
  normalisation (`answers_match`), else symbolically equal (`symbolically_equal`, limited to timeout_s per step)."""
  given = last_boxed_content(response)
  if given is None or len(given) > MAX_BOXED_CHARS:
    return 0.0
  if "\\boxed" in answer or "\\fbox" in answer:
    answer = last_boxed_content(answer) or answer
  return 1.0 if answers_match(given, answer) or symbolically_equal(given, answer, timeout_s) else 0.0


# --- worker pool ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GradeStats:
  """What happened in one `grade_batch` call, for the trainer's logs."""
  items: int = 0
  timeouts: int = 0  # items past their deadline: scored 0, their worker killed and replaced
  crashes: int = 0  # workers that died while grading an item: scored 0, replaced

  @property
  def restarts(self) -> int:
    return self.timeouts + self.crashes


def _worker_main(conn: multiprocessing.connection.Connection, grade_fn: GradeFn) -> None:
  # math-verify logs every timed-out input in full; the parent counts timeouts instead.
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)
  # Ctrl-C reaches the whole process group: the trainer finishes its step (grades included) and saves.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  conn.send("ready")
  while True:
    try:
      task = conn.recv()
    except (EOFError, ConnectionResetError):  # the parent is gone (killed, or os._exit after a lost peer)
      return
    if task is None:
      return
    index, response, answer, options = task
    try:
      score = float(grade_fn(response, answer, **options))
    except (Exception, TimeoutException):
      score = 0.0
    conn.send((index, score))


def _mp_context() -> multiprocessing.context.BaseContext:
  if "forkserver" in multiprocessing.get_all_start_methods():
    ctx = multiprocessing.get_context("forkserver")
    # New workers fork from a server that has math-verify imported already: a restart costs milliseconds.
    ctx.set_forkserver_preload([__name__])
    return ctx
  return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _main_module_left_out(grade_fn: GradeFn):
  """Processes started within do not re-import the caller's `__main__` module (multiprocessing does, by its module
  name or file: spawn.get_preparation_data), unless grade_fn lives there. A worker needs this module and grade_fn's:
  re-running `python -m trapo_jax.main`'s imports (JAX, Flax, the trainer) cost each worker about a second of CPU
  and 200 MB."""
  main = sys.modules.get("__main__")
  if main is None or getattr(grade_fn, "__module__", None) == "__main__":
    yield
    return
  saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
  main.__spec__ = None
  main.__dict__.pop("__file__", None)
  try:
    yield
  finally:
    main.__dict__.pop("__spec__", None)
    main.__dict__.update(saved)


class _Worker:
  """One grading process and the parent's end of its pipe."""

  def __init__(self, ctx: multiprocessing.context.BaseContext, grade_fn: GradeFn):
    self.conn, child_conn = ctx.Pipe()
    self.process = ctx.Process(target=_worker_main, args=(child_conn, grade_fn), daemon=True,
                               name="trapo-grader")
    with _main_module_left_out(grade_fn):
      self.process.start()
    child_conn.close()
    self.started = time.monotonic()
    self.ready = False
    self.task: int | None = None  # index of the item it is grading
    self.deadline = math.inf

  def kill(self) -> None:
    self.process.kill()
    self.process.join()
    self.conn.close()

  def stop(self) -> None:
    try:
      self.conn.send(None)
    except OSError:
      pass
    self.process.join(timeout=5.0)
    if self.process.is_alive():
      self.process.kill()
      self.process.join()
    self.conn.close()


class GraderPool:
  """`workers` long-lived grading processes; `grade_fn(response, answer, timeout_s=..., fallback=...)` runs in them.

  grade_fn must be importable by name (a module-level function); it defaults to `grade`.
  """

  def __init__(self, workers: int = 2, grade_fn: GradeFn = grade):
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    self._ctx = _mp_context()
    self._grade_fn = grade_fn
    self._workers = [_Worker(self._ctx, grade_fn) for _ in range(workers)]
    self._lock = threading.Lock()
    self.pid = os.getpid()

  def map(self, responses: Sequence[str], answers: Sequence[str], timeout_s: float,
          fallback: bool = True) -> tuple[list[float], GradeStats]:
    """Scores `[N]` in input order; each item gets `timeout_s` of wall time from when a worker takes it."""
    # math-verify gives up first, so a kill is the exception
    options = {"timeout_s": max(1, int(timeout_s / 3)), "fallback": fallback}
    scores = [0.0] * len(responses)
    todo = collections.deque(range(len(responses)))
    remaining = len(responses)
    timeouts = crashes = 0
    with self._lock:
      while remaining:
        for w in self._workers:
          if w.ready and w.task is None and todo:
            index = todo.popleft()
            w.task, w.deadline = index, time.monotonic() + timeout_s
            try:
              w.conn.send((index, responses[index], answers[index], options))
            except OSError:
              pass  # it died; its sentinel reports that below
        wake = min(w.deadline if w.ready else w.started + _WORKER_START_TIMEOUT_S for w in self._workers)
        waitables = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        multiprocessing.connection.wait(waitables, timeout=min(1.0, max(0.0, wake - time.monotonic())))
        for slot, w in enumerate(self._workers):
          finished = self._poll(w, scores)
          if finished is not None:
            remaining -= finished
            continue
          if not w.ready and time.monotonic() > w.started + _WORKER_START_TIMEOUT_S:
            w.kill()
            raise RuntimeError(f"grader worker did not start within {_WORKER_START_TIMEOUT_S:.0f} s")
          timed_out = w.task is not None and time.monotonic() >= w.deadline
          if timed_out or not w.process.is_alive():
            if not w.ready:
              w.kill()
              raise RuntimeError(f"grader worker exited during start-up (exit code {w.process.exitcode})")
            if w.task is not None:
              remaining -= 1
              timeouts += timed_out
              crashes += not timed_out
            w.kill()
            self._workers[slot] = _Worker(self._ctx, self._grade_fn)
    return scores, GradeStats(items=len(responses), timeouts=timeouts, crashes=crashes)

  @staticmethod
  def _poll(w: _Worker, scores: list[float]) -> int | None:
    """Reads one message if there is one: 1 for a result, 0 for 'ready', None for nothing (or a dead pipe)."""
    try:
      if not w.conn.poll():
        return None
      message = w.conn.recv()
    except (EOFError, OSError):
      return None
    if message == "ready":
      w.ready = True
      return 0
    index, score = message
    scores[index] = score
    w.task, w.deadline = None, math.inf
    return 1

  def close(self) -> None:
    for w in self._workers:
      w.stop()
    self._workers = []


_POOLS: dict[int, GraderPool] = {}
_POOLS_LOCK = threading.Lock()
_LAST_STATS = GradeStats()


def _pool(workers: int) -> GraderPool:
  with _POOLS_LOCK:
    pool = _POOLS.get(workers)
    if pool is None or pool.pid != os.getpid():  # a forked child must not share its parent's workers
      pool = _POOLS[workers] = GraderPool(workers)
    return pool


def grade_batch(responses: Sequence[str], answers: Sequence[str], *, timeout_s: float = 10.0,
                workers: int = 2, fallback: bool = True) -> list[float]:
  """`[grade(r, a) for r, a in zip(responses, answers)]` in `workers` processes, each item bounded by `timeout_s`.

  An item past its deadline or whose worker dies scores 0; `last_stats()` counts them. The workers are started on
  the first call for a given `workers`, then kept; unlike other spawned processes they do not re-import the
  caller's `__main__` module.
  """
  global _LAST_STATS
  if len(responses) != len(answers):
    raise ValueError(f"responses and answers differ in length: {len(responses)} responses, "
                     f"{len(answers)} answers")
  for name, texts in (("responses", responses), ("answers", answers)):
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")
  if timeout_s <= 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if not responses:
    _LAST_STATS = GradeStats()
    return []
  scores, _LAST_STATS = _pool(workers).map(responses, answers, timeout_s, fallback)
  return scores


def last_stats() -> GradeStats:
  """Counters of the most recent `grade_batch` call."""
  return _LAST_STATS


def close() -> None:
  """Stops the cached worker pools (a later `grade_batch` starts new ones)."""
  with _POOLS_LOCK:
    while _POOLS:
      _, pool = _POOLS.popitem()
      if pool.pid == os.getpid():
        pool.close()


atexit.register(close)
