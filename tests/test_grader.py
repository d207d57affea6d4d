"""The math grader: answer equivalences, the boxed fallback, and the worker pool under hostile input."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import math_verify
import pytest

from trapo_jax.rewards import grader
from trapo_jax.rewards.grader import (GraderPool, answers_match, boxed_fallback, grade, grade_batch, last_boxed_content,
                                      last_stats, normalize_answer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boxed(answer: str) -> str:
  return "Putting it together, the answer is $\\boxed{" + answer + "}$."


CORRECT = [
    (boxed("\\frac{3}{4}"), "\\frac{3}{4}"),
    (boxed("\\dfrac{3}{4}"), "\\frac{3}{4}"),
    (boxed("\\tfrac34"), "\\dfrac{3}{4}"),
    (boxed("0.5"), "\\frac12"),
    (boxed("\\frac{1}{2}"), "0.5"),
    (boxed("6/8"), "\\frac{3}{4}"),
    (boxed("(-\\infty, 3]"), "(-\\infty,3]"),
    (boxed("\\left[ 2, 5 \\right)"), "[2,5)"),
    (boxed("\\{1, 2, 3\\}"), "\\{3, 1, 2\\}"),
    (boxed("1, 2, 3"), "3,2,1"),
    (boxed("45^\\circ"), "45"),
    (boxed("45"), "45^{\\circ}"),
    (boxed("x = 3"), "3"),
    (boxed("3"), "x=3"),
    (boxed("5\\text{ cm}"), "5"),
    (boxed("12 \\text{ inches}"), "12"),
    (boxed("C"), "C"),
    (boxed("(C)"), "C"),
    (boxed("\\textbf{(C)}"), "\\text{(C)}"),
    (boxed("-7"), "-7"),
    (boxed("-\\frac{3}{4}"), "-\\frac34"),
    (boxed("1,000"), "1000"),
    (boxed("1,000,000"), "1000000"),
    (boxed("10{,}080"), "10080"),
    (boxed("\\$18.90"), "18.90"),
    (boxed("\\sqrt{12}"), "2\\sqrt{3}"),
    (boxed("\\text{Evelyn}"), "\\text{Evelyn}"),
    ("We get 1 + 1 = 2, so the answer is \\boxed{2}.", "2"),
    ("First \\boxed{3}, but on reflection \\boxed{4}", "4"),
    ("The box: \\fbox{17}", "17"),
    ("No box at all, the answer is 42.", "42"),
]

WRONG = [
    (boxed("\\frac{4}{3}"), "\\frac{3}{4}"),
    (boxed("0.75001"), "\\frac{3}{4}"),
    (boxed("(-\\infty, 3)"), "(-\\infty,3]"),
    (boxed("[2, 5]"), "[2,5)"),
    (boxed("\\{1, 2\\}"), "\\{1, 2, 3\\}"),
    (boxed("135^\\circ"), "45"),
    (boxed("x = 4"), "3"),
    (boxed("6\\text{ cm}"), "5"),
    (boxed("B"), "C"),
    (boxed("7"), "-7"),
    (boxed("-7"), "7"),
    (boxed("1,001"), "1000"),
    (boxed("100"), "1000"),
    (boxed("\\text{Eve}"), "\\text{Evelyn}"),
    ("First \\boxed{4}, but on reflection \\boxed{3}", "4"),
    ("no answer here", "5"),
    ("", "5"),
]


@pytest.mark.parametrize("response, answer", CORRECT)
def test_grade_accepts_equivalent_answers(response, answer):
  assert grade(response, answer) == 1.0


@pytest.mark.parametrize("response, answer", WRONG)
def test_grade_rejects_wrong_answers(response, answer):
  assert grade(response, answer) == 0.0


def test_a_reference_answer_is_parsed_once_per_process_and_a_failed_parse_is_not_kept(monkeypatch):
  calls = []
  real = math_verify.parse

  def counted(text, **kwargs):
    if "extraction_config" not in kwargs:  # math-verify's own step, not the boxed fallback's LaTeX-only parse
      calls.append(text)
    if text == "$\\frac{5}{7}$" and calls.count(text) == 1:
      raise TimeoutError("a parse cut short")
    return real(text, **kwargs)

  monkeypatch.setattr(math_verify, "parse", counted)
  grader._parsed_answer.cache_clear()
  rollouts = [boxed("\\frac{3}{4}"), boxed("0.75"), boxed("\\frac{6}{8}"), boxed("7")]
  assert [grade(r, "\\frac{3}{4}") for r in rollouts] == [1.0, 1.0, 1.0, 0.0]
  assert calls.count("$\\frac{3}{4}$") == 1  # the group's responses were each parsed, the answer once
  assert all(calls.count("Putting it together, the answer is $\\boxed{" + a + "}$.") == 1
             for a in ("\\frac{3}{4}", "0.75", "\\frac{6}{8}", "7"))
  # A parse that raised scores that rollout by the fallback alone and is tried again for the next one.
  assert grade(boxed("\\frac{5}{7}"), "\\frac{5}{7}", fallback=False) == 0.0
  assert grade(boxed("\\frac{5}{7}"), "\\frac{5}{7}", fallback=False) == 1.0
  assert calls.count("$\\frac{5}{7}$") == 2
  grader._parsed_answer.cache_clear()


def test_grade_falls_back_to_boxed_string_match():
  # A reference with a stray `$ $` (minerva-0072): math-verify alone rejects its own answer.
  answer = "x_{0} \\cos (\\omega t)+$ $\\dot{x}_{0} \\sin (\\omega t) / \\omega"
  response = boxed(answer)
  assert not math_verify.verify(math_verify.parse("$" + answer + "$"), math_verify.parse(response))
  assert grade(response, answer) == 1.0
  assert grade(response, answer, fallback=False) == 0.0  # the official training reward
  assert grade_batch([response, response], [answer, answer], fallback=False) == [0.0, 0.0]
  assert grade_batch([response], [answer]) == [1.0]
  assert grade(boxed("x_{0} \\cos (\\omega t)"), answer) == 0.0


# --- the fallback on its own ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\frac{a}b", "\\frac{a}{b}"),
    ("3/4", "\\frac{3}{4}"),
    (" \\left( 1, 2 \\right) ", "(1,2)"),
    ("10\\!000", "10000"),
    ("1,000", "1000"),
    ("-12,345.5", "-12345.5"),
    ("(1,234)", "(1,234)"),  # a pair, not a thousands separator
    ("1{,}000", "1000"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("\\$5.00", "5.00"),
    ("50\\%", "50"),
    ("5 \\text{ cm}", "5"),
    ("5\\text{ cm}^2", "5"),
    ("\\text{yes}", "yes"),
    ("\\text{(B)}", "B"),
    ("(B)", "B"),
    ("x = 3", "3"),
    ("k=\\frac{1}{2}", "\\frac{1}{2}"),
    ("y = 2x + 1", "2x+1"),
    ("abc = 3", "abc=3"),  # only a short variable name is dropped
    ("\\sqrt3", "\\sqrt{3}"),
    (".5", "0.5"),
    ("\\{.5\\}", "\\{0.5\\}"),
    ("7.", "7"),
    ("a \\leq b", "a\\leb"),
    ("1\\\\2", "1\\2"),
])
def test_normalize_answer(raw, expected):
  assert normalize_answer(raw) == expected


@pytest.mark.parametrize("given, reference, expected", [
    ("0.5", "\\frac{1}{2}", True),
    ("0.50", "\\frac12", True),
    ("-0.25", "-\\frac{1}{4}", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{3}", False),
    ("2", "2.0", True),
    ("2", "2.0001", False),
    ("\\frac{1}{0}", "\\frac{1}{0}", True),  # equal strings; no division
    ("\\frac{1}{0}", "\\frac{2}{0}", False),
    ("monday", "\\text{Monday}", True),
    ("", "", False),
    ("1" * 100, "1" * 99 + "2", False),
])
def test_answers_match(given, reference, expected):
  assert answers_match(given, reference) is expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{5}", "5"),
    ("a \\boxed{\\frac{1}{2}} b", "\\frac{1}{2}"),
    ("\\boxed{{{1}}{2}}", "{{1}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not structure
    ("\\boxed{\\}}", "\\}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{1} then \\fbox{2}", "2"),
    ("\\fbox{1} then \\boxed{2}", "2"),
    ("\\boxed 5$", "5"),
    ("\\boxed{1} then \\boxed{2", None),  # the last one is unclosed
    ("\\boxed", None),
    ("no box", None),
    ("\\boxed{" + "{" * 10_000 + "x" + "}" * 10_000 + "}", "{" * 10_000 + "x" + "}" * 10_000),
])
def test_last_boxed_content(text, expected):
  assert last_boxed_content(text) == expected


def test_boxed_fallback():
  assert boxed_fallback("so \\boxed{\\dfrac12}.", "0.5") == 1.0
  assert boxed_fallback("so \\boxed{1,000} dollars", "1000") == 1.0
  assert boxed_fallback("first \\boxed{3} then \\boxed{4}", "3") == 0.0
  assert boxed_fallback("the answer is 3", "3") == 0.0  # no box, no fallback
  assert boxed_fallback("\\boxed{3}", "\\boxed{3}") == 1.0
  assert boxed_fallback("\\boxed{" + "1" * 2000 + "}", "1" * 2000) == 0.0  # too long to be an answer


# --- grade_batch ----------------------------------------------------------------------------------------------


def test_grade_batch_agrees_with_grade():
  items = CORRECT[::3] + WRONG[::3]
  responses, answers = [r for r, _ in items], [a for _, a in items]
  assert grade_batch(responses, answers, workers=2) == [grade(r, a) for r, a in items]
  assert last_stats().items == len(items)
  assert last_stats().restarts == 0


def test_grade_batch_argument_checks():
  assert grade_batch([], []) == []
  with pytest.raises(ValueError, match="3 responses, 2 answers"):
    grade_batch(["a", "b", "c"], ["1", "2"])
  with pytest.raises(TypeError, match=r"responses\[1\]"):
    grade_batch(["a", None], ["1", "2"])


def test_pool_is_reused_and_closed():
  grade_batch([boxed("1")], ["1"], workers=2)
  pool = grader._POOLS[2]
  grade_batch([boxed("1")], ["1"], workers=2)
  assert grader._POOLS[2] is pool
  grader.close()
  assert not grader._POOLS
  assert grade_batch([boxed("1")], ["1"], workers=2) == [1.0]


def test_grade_batch_after_jax_started_threads():
  import jax.numpy as jnp
  grader.close()
  assert float(jnp.arange(8.0).sum()) == 28.0  # the XLA runtime and its threads are up
  assert grade_batch([boxed("28"), boxed("27")], ["28", "28"], workers=2) == [1.0, 0.0]


MB = 1 << 20
WORST = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{1000000!}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{" * 100_000,
    "\\boxed{x+" + "x+" * 20_000 + "1}",
]
HOSTILE = WORST + [
    "$9^{9^{9^{9}}}$", "9**9**9**9", "\\boxed{(10^{100})!}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "\\boxed{10^{10^{10}}}",
    "\\boxed{99999999999^{99999999999}}", "\\boxed{\\sqrt[1000000]{2}}", "\\boxed{\\sqrt[10^{100}]{2}}",
    "\\boxed{" + "9" * 100_000 + "}", "\\boxed{" + "1" * 5_000 + "." + "1" * 5_000 + "}", "\\boxed{1e1000000000}",
    "\\boxed{10^{-10^{10}}}", "\\boxed{\\frac{1}{0}}", "\\boxed{\\frac{}{}}", "\\boxed{\\frac{\\frac{\\frac{}{}}{}}{}}",
    "\\boxed{0^0}", "\\boxed{\\infty - \\infty}", "\\boxed{\\sum_{n=1}^{10^{12}} n^{n}}",
    "\\boxed{\\prod_{k=1}^{10^{9}} k}", "\\boxed{\\int_0^1 e^{x^{x^{x}}} dx}", "\\boxed{\\binom{10^{9}}{5 \\cdot 10^{8}}}",
    "\\boxed{" + "x^" * 5000 + "2}", "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}", "\\boxed{" + "a" * MB, "x" * MB,
    "\\boxed{1}" * 100_000, "$" * MB, "\\" * MB, "{" * MB, "}" * MB, "\\boxed{1" + "}" * MB,
    "\x00" * 1000 + "\\boxed{\x00}", "\\boxed{1\x002}", "é∑∫√∞≠≤ \\boxed{√2}" * 1000, "\\boxed{\ud800}", "\\",
    "\\boxed", "\\boxed{", "}", "", " ", "\\boxed{\\}", "\\boxed{\\\\\\\\}", "\\left(" * 10_000,
    "\\begin{pmatrix}" + "1&" * 10_000 + "\\end{pmatrix}", "\\boxed{" + "1," * 100_000 + "1}",
    "\\boxed{\\{" + ",".join(str(i) for i in range(20_000)) + "\\}}", "$x$ " * 200_000,
    "\\boxed{" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "}", "\\boxed{\\text{" + "a" * 100_000 + "}}",
    "\\boxed{" + "1/" * 10_000 + "1}", "\\boxed{1.}" + "." * MB, "\\boxed{\\pi^{\\pi^{\\pi^{\\pi}}}}",
    "\\boxed{e^{e^{e^{e^{e}}}}}", "\\boxed{\\tan(10^{100})}", "\\boxed{\\lim_{x\\to\\infty} x^{x^{x}}}",
]
TIMEOUT_S = 2.0


def test_hostile_batch_finishes_in_time_and_pool_survives():
  assert len(HOSTILE) >= 50
  start = time.monotonic()
  scores = grade_batch(HOSTILE, ["\\frac{1}{2}"] * len(HOSTILE), timeout_s=TIMEOUT_S, workers=2)
  elapsed = time.monotonic() - start
  assert elapsed <= math.ceil(len(HOSTILE) / 2) * (TIMEOUT_S + 1)
  assert scores == [0.0] * len(HOSTILE)
  assert last_stats().items == len(HOSTILE)
  assert grade_batch([boxed("\\frac{1}{2}")], ["0.5"], timeout_s=TIMEOUT_S, workers=2) == [1.0]


@pytest.mark.parametrize("index", range(len(WORST)))
def test_worst_single_items_finish_in_time(index):
  start = time.monotonic()
  assert grade_batch([WORST[index]], ["\\frac{1}{2}"], timeout_s=TIMEOUT_S, workers=2) == [0.0]
  assert time.monotonic() - start <= TIMEOUT_S + 1


def misbehaving_grade(response: str, answer: str, **options) -> float:
  """`grade`, except on requests to die or hang in ways math-verify's own timeouts cannot stop."""
  if response == "exit":
    os._exit(3)
  if response == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
  if response == "spin":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    while True:
      pass
  if response == "sleep":
    time.sleep(3600)
  if response == "pid":
    return float(os.getpid())
  return grade(response, answer, **options)


@pytest.mark.parametrize("workers", [1, 2])
def test_crashed_and_hung_workers_are_replaced(workers):
  pool = GraderPool(workers=workers, grade_fn=misbehaving_grade)
  try:
    pids_before = set(pool.map(["pid"] * 4, ["0"] * 4, TIMEOUT_S)[0])
    batch = ["exit", boxed("1"), "spin", boxed("1"), "segfault", "sleep", boxed("2"), boxed("1")]
    start = time.monotonic()
    scores, stats = pool.map(batch, ["1"] * len(batch), TIMEOUT_S)
    assert time.monotonic() - start <= math.ceil(len(batch) / workers) * (TIMEOUT_S + 1)
    assert scores == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert (stats.timeouts, stats.crashes, stats.restarts) == (2, 2, 4)
    pids_after = set(pool.map(["pid"] * 4, ["0"] * 4, TIMEOUT_S)[0])
    if workers == 1:
      assert len(pids_after) == 1 and pids_after != pids_before
    assert pool.map([boxed("\\frac12")], ["0.5"], TIMEOUT_S)[0] == [1.0]
  finally:
    pool.close()


def main_reimported(response: str, answer: str, **options) -> float:
  """1.0 in a worker that re-imported the `__main__` module of _SCRIPT's process (multiprocessing runs it as
  `__mp_main__` and makes it the worker's `__main__`)."""
  del response, answer, options
  return float(hasattr(sys.modules["__main__"], "own_grade"))


_SCRIPT = """
import sys
from tests import test_grader
from trapo_jax.rewards import grader

def own_grade(response, answer, **options):  # lives in __main__: its workers must import the script
  return 7.0

if __name__ == "__main__":
  for fn in (test_grader.main_reimported, own_grade):
    pool = grader.GraderPool(workers=1, grade_fn=fn)
    print(pool.map(["x"], ["x"], 30.0)[0][0])
    pool.close()
  print("__spec__" in vars(sys.modules["__main__"]), sys.modules["__main__"].__file__ == sys.argv[0])
"""


def test_workers_do_not_import_the_callers_main_module_unless_grade_fn_lives_there(tmp_path):
  """A `python -m trapo_jax.main` run's workers would otherwise import JAX, Flax and the trainer again, a second of
  CPU and 200 MB each; a grade_fn defined in the script itself still reaches its workers; the caller's __main__ is
  left as it was."""
  script = tmp_path / "script.py"
  script.write_text(_SCRIPT)
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["0.0", "7.0", "True", "True"], out.stdout


# --- reliability: bounded off the main thread, symbolic equivalence in the fallback -----------------------------


def test_grade_off_the_main_thread_is_bounded():
  """grade() in a thread (no signal alarm there) on an input that math-verify alone never finishes: the thread holds
  the GIL in a big-integer power, so a fresh interpreter is used and must finish in time."""
  code = "\n".join([
      "import threading",
      "from trapo_jax.rewards import grader",
      "out = []",
      "def work():",
      "  out.append(grader.grade('\\\\boxed{9^{9^{9^{9}}}}', '1', timeout_s=1))",
      "  out.append(grader.grade('so \\\\boxed{\\\\sqrt{8}}', '2\\\\sqrt{2}', timeout_s=1))",
      "t = threading.Thread(target=work)",
      "t.start()",
      "t.join()",
      "print(out)",
  ])
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[-2] == "[0.0, 1.0]"
  assert time.monotonic() - start < 60


@pytest.mark.parametrize("given, reference", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "1/2"), ("1/2", "\\frac{1}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"), ("(x+1)^2", "x^2+2x+1"),
    ("[\\frac{1}{2}, 3)", "[0.5, 3)"), ("(-\\infty, \\sqrt{4}]", "(-\\infty, 2]"),
    ("\\{1, \\sqrt{4}\\}", "\\{2, 1\\}"), ("\\{\\frac{1}{2}, 3\\}", "\\{3, 0.5\\}"),
    ("2\\sqrt{2}\\text{ cm}", "\\sqrt{8}"),
])
def test_boxed_fallback_symbolic_equivalence(given, reference):
  assert boxed_fallback(boxed(given), reference) == 1.0


@pytest.mark.parametrize("given, reference", [
    ("2\\sqrt{3}", "\\sqrt{8}"), ("[0.5, 3]", "[0.5, 3)"), ("(0.5, 3)", "[\\frac{1}{2}, 3)"),
    ("\\{1, 3\\}", "\\{1, 2\\}"), ("\\{1, 2, 2\\}", "\\{1, 2, 3\\}"), ("(1, 2)", "(2, 1)"), ("x", "y"),
    ("x^2+2x", "(x+1)^2"), ("\\frac{1}{3}", "0.33"), ("\\infty", "-\\infty"),
])
def test_boxed_fallback_symbolic_rejects(given, reference):
  assert boxed_fallback(boxed(given), reference) == 0.0


def fallback_only(response: str, answer: str, **options) -> float:
  """The boxed fallback alone (its symbolic stage is reached without math-verify's first look at the response)."""
  return boxed_fallback(response, answer, timeout_s=options["timeout_s"])


def test_boxed_fallback_symbolic_survives_hostile_inputs(tmp_path):
  marker = tmp_path / "ran"
  hostile = [
      "9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "1000000!", "(10^{100})!", "99999999999^{99999999999}",
      "\\sqrt[10^{100}]{2}", "\\sum_{n=1}^{10^{12}} n^{n}", "\\prod_{k=1}^{10^{9}} k", "\\int_0^1 e^{x^{x^{x}}} dx",
      "\\binom{10^{9}}{5 \\cdot 10^{8}}", "\\lim_{x\\to\\infty} x^{x^{x}}", "\\tan(10^{100})",
      "{" * 400 + "1" + "}" * 400, "\\frac{1}{" * 150 + "2" + "}" * 150, "\\sqrt{" * 300 + "2" + "}" * 300,
      "x^" * 400 + "2", "(" * 450 + "1" + ")" * 450, "\\{" + ",".join(str(i) for i in range(300)) + "\\}",
      f"__import__('os').system('touch {marker}')", f"\\text{{__import__('os').system('touch {marker}')}}",
      f"eval(\"open('{marker}', 'w')\")", "\\input{/etc/passwd}", "\\ud800", "\x00", "\\frac{}{}", "\\frac{1}{0}",
      "[1, \\infty", "\\{1, 2", "0^0", "\\infty - \\infty",
  ]
  pool = GraderPool(workers=2, grade_fn=fallback_only)
  try:
    start = time.monotonic()
    scores, _ = pool.map([boxed(h) for h in hostile], ["\\frac{1}{2}"] * len(hostile), TIMEOUT_S)
    assert time.monotonic() - start <= math.ceil(len(hostile) / 2) * (TIMEOUT_S + 1)
    assert scores == [0.0] * len(hostile)
    assert pool.map([boxed("\\sqrt{8}")], ["2\\sqrt{2}"], TIMEOUT_S)[0] == [1.0]  # the pool still grades
  finally:
    pool.close()
  assert not marker.exists()
