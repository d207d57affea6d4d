"""Runs that survive what clusters do to them: one test (or more) per failure found by trying faults on purpose.

  1 a corrupt newest checkpoint stops train/eval/export          test_1_*
  2 eval/export on a workdir without checkpoint use the base     test_2_*
  3 two runs on one workdir interleave their outputs             test_3_*
  4 resuming with another algorithm or model shape               test_4_*
  5 metrics.jsonl / TensorBoard keep a killed run's later steps  test_5_*
  6 the exported HF directory never stops generating, mode 0600  test_6_*
  7 data errors: no usable row, a non-UTF-8 byte, bad parquet    test_7_*
  8 errors outside the config schema are tracebacks              test_8_*
  9 SIGTERM exits 0, Ctrl-C loses the steps since a checkpoint   tests/test_trainer.py::test_sigterm_and_ctrl_c_*
 10 grade() off the main thread runs unbounded                   tests/test_grader.py::test_grade_off_the_main_thread_*
 11 the evaluation fallback has no symbolic equivalence          tests/test_grader.py::test_boxed_fallback_symbolic_*

The command-line tests run `python -m trapo_jax.main` in a subprocess. They share one workdir made once per module by
a run killed with SIGKILL after a few steps (checkpoints every step, a stale lock, logs past the last checkpoint);
each test works on its own copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

import trapo_jax
from trapo_jax.data import demos, pipeline, templates
from trapo_jax.train import checkpoint as ckpt_lib
from trapo_jax.train import metrics as metrics_lib
from trapo_jax.train import trainer
from trapo_jax.train import workdir as workdir_lib
from tests.helpers import ENV, FIXTURE, ROOT, TINY_FLAGS, config_of, tiny

def _main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "trapo_jax.main", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def _tiny_main(workdir: str, *args: str) -> subprocess.CompletedProcess:
  return _main(f"--workdir={workdir}", *TINY_FLAGS, f"--config.data.data_dir={workdir}/tfds", *args)


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  """The error line of a run that failed with a user-facing error: exit 2, no traceback, one line naming it all."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if all(f in line for f in fragments)]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _metric_steps(workdir) -> list[int]:
  return [r["step"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> str:
  """A workdir whose run was killed with SIGKILL after at least 3 logged steps and 2 checkpoints."""
  workdir = str(tmp_path_factory.mktemp("killed") / "run")
  proc = subprocess.Popen(
      [sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}", *TINY_FLAGS, "--config.train.steps=1000",
       f"--config.data.data_dir={workdir}/tfds"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  metrics = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    logged = len(metrics_lib.read_jsonl(metrics, tolerant=True)) if os.path.exists(metrics) else 0
    if logged >= 3 and len(_steps(workdir)) >= 2:
      break
    time.sleep(0.2)
  proc.kill()
  proc.communicate(timeout=60)
  assert os.path.exists(os.path.join(workdir, "LOCK"))  # left behind by the killed run
  return workdir


@pytest.fixture
def copy_of_killed(killed, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(killed, workdir)
  return workdir


# --- 1: corrupt checkpoints -------------------------------------------------------------------------------------


def _truncate_arrays(workdir: str, step: int) -> None:
  data = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(10)


@pytest.mark.slow
def test_1_corrupt_newest_checkpoint_export_falls_back_to_an_older_one(copy_of_killed):
  steps = _steps(copy_of_killed)
  _truncate_arrays(copy_of_killed, steps[-1])
  proc = _tiny_main(copy_of_killed, "--mode=export")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # No traceback through our code. Orbax abandons the sibling reads of the failed one, and TensorStore's threads may
  # still print theirs ("Event loop is closed") after the loop is gone: its noise, not ours, and not every run.
  frames = [line for line in proc.stderr.splitlines() if line.lstrip().startswith('File "')]
  ours = f'File "{os.path.dirname(trapo_jax.__file__)}{os.sep}'
  assert not [f for f in frames if ours in f], proc.stderr[-3000:]
  warning = [line for line in proc.stderr.splitlines() if "does not restore" in line]
  assert len(warning) == 1 and f"checkpoints/{steps[-1]} does not restore" in warning[0], proc.stderr[-3000:]
  # The reason is the bottom of orbax's error (the truncated file), not its dump of the TensorStore spec.
  assert "TensorStore(" not in warning[0] and len(warning[0]) < 600, warning[0]
  assert f"using the checkpoint of step {steps[-2]}" in proc.stderr, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(copy_of_killed, "hf", "model.safetensors"))


def _template(cfg, workdir):
  from trapo_jax.train import state as state_lib
  ctx = trainer.build_context(cfg, workdir)
  return state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)


def test_1_missing_metadata_and_no_readable_checkpoint(copy_of_killed):
  cfg = tiny(config_of(), copy_of_killed)
  steps = _steps(copy_of_killed)
  template = _template(cfg, copy_of_killed)
  os.remove(os.path.join(copy_of_killed, "checkpoints", str(steps[-1]), "state", "_METADATA"))
  _, step = ckpt_lib.restore_params(copy_of_killed, template)
  assert step == steps[-2]
  for s in steps[:-1]:
    _truncate_arrays(copy_of_killed, s)
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    ckpt_lib.restore_params(copy_of_killed, template)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{copy_of_killed}: no checkpoint restores")
  assert f"delete {os.path.join(copy_of_killed, 'checkpoints')}" in message


def test_1_training_resumes_from_the_newest_readable_checkpoint(copy_of_killed):
  steps = _steps(copy_of_killed)
  _truncate_arrays(copy_of_killed, steps[-1])
  trainer.run(tiny(config_of(), copy_of_killed, steps=steps[-1]), copy_of_killed)
  # The broken step was moved aside and saved again by the resumed run.
  assert os.listdir(os.path.join(copy_of_killed, ckpt_lib.UNREADABLE_DIR)) == [str(steps[-1])]
  assert _steps(copy_of_killed)[-1] == steps[-1]
  assert _metric_steps(copy_of_killed) == list(range(1, steps[-1] + 1))


# --- 2: eval/export without a checkpoint ------------------------------------------------------------------------


def test_2_eval_of_a_workdir_without_checkpoint_is_an_error(tmp_path):
  workdir = str(tmp_path / "typo")
  line = _one_line_error(_tiny_main(workdir, "--mode=eval"), workdir, "no checkpoint")
  assert "--allow_initial_policy" in line
  assert not os.path.exists(workdir)  # nothing created


def test_2_export_needs_a_checkpoint_unless_the_initial_policy_is_allowed(tmp_path):
  workdir, out = str(tmp_path / "typo"), str(tmp_path / "hf")
  cfg = tiny(config_of(), workdir)
  with pytest.raises(ckpt_lib.NoCheckpoint, match="no checkpoint"):
    trainer.export(cfg, workdir, out)
  assert not os.path.exists(workdir) and not os.path.exists(out)
  trainer.export(cfg, workdir, out, allow_initial_policy=True)
  assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
def test_2_eval_and_export_use_the_runs_own_config(copy_of_killed):
  """Given only the workdir, eval and export run with the config the training run stored (its tiny model, not the
  default experiment's): `--config.key=` overrides apply on top of it, a config file named on the command line
  replaces it."""
  step = _steps(copy_of_killed)[-1]
  proc = _main("--mode=eval", f"--workdir={copy_of_killed}", "--config.eval.benchmarks=('math500',)",
               "--config.eval.max_problems=4", "--config.eval.max_new_tokens=8", "--config.data.max_prompt_len=1024")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(os.path.join(copy_of_killed, "eval", f"step_{step}", "results.json")))
  assert list(results["benchmarks"]) == ["math500"] and results["benchmarks"]["math500"]["problems"] == 4
  out = os.path.join(copy_of_killed, "exported")
  proc = _main("--mode=export", f"--workdir={copy_of_killed}", f"--export_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(os.path.join(out, "config.json")))["hidden_size"] == 32  # TINY_FLAGS' model
  proc = _main("--mode=export", f"--workdir={copy_of_killed}", "--config=experiments/configs/default.py")
  _one_line_error(proc, "the checkpoint's policy has model.")  # the default experiment's model is another


def test_2_eval_and_export_join_their_own_job_not_the_stored_runs(tmp_path):
  """A workdir trained by 2 processes, exported by 1: the stored run's process count and coordinator are not used
  (they would wait for a process that never comes)."""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  cfg = tiny(config_of(), workdir)
  with cfg.unlocked():
    cfg.distributed.update(dict(enabled=True, coordinator_address="localhost:1", num_processes=2, process_id=1))
  os.makedirs(workdir)
  workdir_lib.save_config(workdir, cfg)
  proc = _main("--mode=export", f"--workdir={workdir}", f"--export_dir={out}", "--allow_initial_policy", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(os.path.join(out, "config.json")))["hidden_size"] == 32  # the stored run's model


# --- 3: one workdir, one run ------------------------------------------------------------------------------------


def test_3_second_run_on_a_locked_workdir_exits_naming_the_holder(copy_of_killed):
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(copy_of_killed, "LOCK"))  # the killed run's
  lock = workdir_lib.acquire(copy_of_killed)  # this test's own process holds it: alive, on this host
  try:
    proc = _tiny_main(copy_of_killed, f"--config.train.steps={_steps(copy_of_killed)[-1]}")
    line = _one_line_error(proc, "in use by")
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line and os.path.join(copy_of_killed, "LOCK") in line
  finally:
    lock.release()
  assert not os.path.exists(os.path.join(copy_of_killed, "LOCK"))


def test_3_lock_of_a_dead_process_is_taken_over_and_another_hosts_is_not(tmp_path, caplog):
  dead = subprocess.Popen(["true"])
  dead.wait()
  path = tmp_path / "LOCK"
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
  lock = workdir_lib.acquire(str(tmp_path))
  assert any("taking over the lock of pid %d" % dead.pid in r.getMessage() for r in caplog.records)
  assert json.loads(path.read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by pid {os.getpid()}"):
    workdir_lib.acquire(str(tmp_path))  # held by a live process (this one)
  lock.release()
  assert not path.exists()
  path.write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": "earlier"}))
  with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by pid {dead.pid} on elsewhere"):
    workdir_lib.acquire(str(tmp_path))


def test_3_runs_sharing_a_fresh_data_dir_prepare_it_once(tmp_path):
  import threading
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(source="demos", path=FIXTURE))
  results, errors = [], []

  def load():
    try:
      results.append(pipeline.load_examples(cfg, "train", data_dir=str(tmp_path / "tfds")))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=load) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 3 and results[0] == results[1] == results[2]


# --- 4: run identity --------------------------------------------------------------------------------------------


def test_4_resuming_with_another_algorithm_or_model_shape_names_the_key(copy_of_killed):
  steps = _steps(copy_of_killed)
  with pytest.raises(workdir_lib.IdentityMismatch) as error:
    trainer.run(tiny(config_of("grpo"), copy_of_killed, steps=steps[-1] + 1), copy_of_killed)
  assert "\n" not in str(error.value) and "algo='trapo', this one 'grpo'" in str(error.value)
  assert "--allow_config_change" in str(error.value)
  cfg = tiny(config_of(), copy_of_killed, steps=steps[-1] + 1)
  with cfg.unlocked():
    cfg.model.head_dim = 8
  with pytest.raises(workdir_lib.IdentityMismatch, match="model.head_dim=16, this one 8"):
    trainer.run(cfg, copy_of_killed)
  assert _steps(copy_of_killed) == steps  # nothing written
  with pytest.raises(workdir_lib.IdentityMismatch, match="policy has model.head_dim=16, the config 8"):
    trainer.export(cfg, copy_of_killed, os.path.join(copy_of_killed, "hf"))
  cfg = tiny(config_of(), copy_of_killed, steps=steps[-1] + 1)
  with cfg.unlocked():
    cfg.data.shuffle_seed = 1
    cfg.eval.grader_timeout_s = 7.0  # allowed to change without asking
  trainer.run(cfg, copy_of_killed, allow_config_change=True)
  ck = ckpt_lib.Checkpointer(copy_of_killed, keep=10, every=1)
  assert ck.restore_meta(steps[-1] + 1)["identity"]["data.shuffle_seed"] == 1
  ck.close()


def test_4_the_refusal_names_the_first_key_then_each_other_once():
  stored = {"algo": "trapo", "seed": 0, "loss.a": 1, "loss.b": 2}
  current = {"algo": "grpo", "seed": 1, "loss.a": 3, "loss.b": 2}
  with pytest.raises(workdir_lib.IdentityMismatch) as error:
    workdir_lib.check_resume({"identity": stored}, current, workdir="w")
  assert "algo='trapo', this one 'grpo' (and 2 more: loss.a, seed);" in str(error.value)


def test_4_identity_leaves_out_only_the_listed_keys():
  cfg = config_of()
  model_cfg = trainer.state_lib.model_config(cfg)
  identity = workdir_lib.run_identity(cfg, model_cfg)
  assert {"algo", "seed", "trapo.alpha", "trapo.stages", "loss.entropy_coef", "optim.lr", "data.path",
          "model_shape.hidden_size", "train.batch_prompts"} <= set(identity)
  # Neither what may change on resume, nor the settings of methods this run does not use.
  assert not any(k.startswith(("eval.", "mesh.", "distributed.", "luffy.", "sft_then_rl.")) for k in identity)
  assert "train.steps" not in identity and "data.data_dir" not in identity
  with cfg.unlocked():
    cfg.train.steps += 1
    cfg.mesh.fsdp = 2
    cfg.eval.temperature = 1.0
    cfg.luffy.gamma = 0.5
  assert workdir_lib.run_identity(cfg, model_cfg) == identity


# --- 5: logs describe one run -----------------------------------------------------------------------------------


def _tb_scalars(tb_dir) -> list[tuple[str, int]]:
  """(tag, step) of every scalar in a TensorBoard directory, read with an independent TFRecord reader."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  out = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (n,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + n]
      assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(payload)
      event = event_pb2.Event.FromString(payload)
      out += [(v.tag, event.step) for v in event.summary.value]
      pos += 16 + n
  return out


def test_5_fresh_start_after_a_kill_before_the_first_checkpoint_rewrites_the_logs(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=3)
  w.write(1, {"loss": 1.0})
  w.close()
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=3, initial_step=0)
  w.write(1, {"loss": 2.0})
  w.close()
  assert [(r["step"], r["loss"]) for r in metrics_lib.read_jsonl(w.path)] == [(1, 2.0)]
  assert _tb_scalars(tmp_path / "tb") == [("loss", 1)]


def test_5_resume_cuts_tensorboard_and_a_torn_last_row(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=4)
  for step in range(1, 5):
    w.write(step, {"loss": float(step), "reward/mean": 0.5})
  w.close()
  with open(w.path, "a") as f:
    f.write('{"step": 5, "lo')  # a kill in the middle of a row
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=4, initial_step=2)
  w.write(3, {"loss": 30.0, "reward/mean": 0.75})
  w.close()
  assert [(r["step"], r["loss"]) for r in metrics_lib.read_jsonl(w.path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  scalars = _tb_scalars(tmp_path / "tb")
  assert sorted(scalars) == sorted([(tag, s) for s in (1, 2, 3) for tag in ("loss", "reward/mean")])


@pytest.mark.slow
def test_5_rerun_after_kill_takes_over_the_lock_and_logs_each_step_once(copy_of_killed):
  steps = _steps(copy_of_killed)
  proc = _tiny_main(copy_of_killed, f"--config.train.steps={steps[-1] + 1}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "taking over the lock of pid" in proc.stderr
  assert not os.path.exists(os.path.join(copy_of_killed, "LOCK"))
  assert _metric_steps(copy_of_killed) == list(range(1, steps[-1] + 2))
  scalars = _tb_scalars(os.path.join(copy_of_killed, "tb"))
  assert len(scalars) == len(set(scalars)) and max(s for _, s in scalars) == steps[-1] + 1


# --- 6: the exported directory works with transformers ----------------------------------------------------------


def test_6_export_stops_at_eos_in_transformers_and_follows_the_umask(tmp_path):
  import torch
  import transformers
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  old = os.umask(0o022)
  try:
    trainer.export(tiny(config_of(), workdir), workdir, out, allow_initial_policy=True)
  finally:
    os.umask(old)
  assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o644
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == [type(model).__name__]
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert "chat_template" in json.load(f)
  # The chat template writes the training prompt of the config (data.template), whatever its text holds.
  problem = "What is {x} + \\boxed{} {{ 1 }}?"
  chat = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                       add_generation_prompt=True)
  assert chat == templates.format_prompt(problem, config_of().data.template)
  assert model.config.eos_token_id == tokenizer.eos_token_id == 2 and model.config.pad_token_id == 0
  assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
  # Make EOS the model's argmax after any token: every embedding row is dominated by dimension 0, which the final
  # norm alone passes on, and EOS's output row is largest there.
  with torch.no_grad():
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
    for emb in {id(w): w for w in (model.model.embed_tokens.weight, model.get_output_embeddings().weight)}.values():
      emb[:, 0] = 100.0
      emb[tokenizer.eos_token_id, 0] = 200.0
  prompt = torch.tensor([[5, 6, 7]])
  generated = model.generate(prompt, max_new_tokens=20, do_sample=False)
  assert generated.tolist() == [[5, 6, 7, tokenizer.eos_token_id]]


# --- 7: data errors ---------------------------------------------------------------------------------------------


def _data_cfg(path):
  import ml_collections
  return ml_collections.ConfigDict(dict(source="demos", path=str(path)))


def _rows():
  """Usable rows of the TRAPO-layout fixture (which also holds broken ones on purpose)."""
  rows = []
  with open(FIXTURE) as f:
    for line in f:
      try:
        rows.append(demos.parse_row(json.loads(line), "TRAPO/verl") and json.loads(line))
      except (ValueError, demos._BadRow):  # pylint: disable=protected-access
        pass
  return rows


def test_7_no_usable_row_names_the_file_and_the_reasons(tmp_path):
  path = tmp_path / "few.jsonl"
  rows = _rows()[:3]
  for r in rows:
    r["extra_info"]["answer_list"] = r["extra_info"]["answer_list"][:1]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
  with pytest.raises(demos.DataError) as error:
    pipeline.load_examples(_data_cfg(path), "train", data_dir=str(tmp_path / "tfds"))
  assert str(error.value) == (f"0 of 4 rows usable in {os.path.realpath(path)}: fewer than 2 solutions: [0, 1, 2]; "
                              f"unparsable: [3]")


def test_7_a_non_utf8_byte_makes_its_row_unusable(tmp_path, caplog):
  path = tmp_path / "bytes.jsonl"
  lines = [json.dumps(r).encode() for r in _rows()[:3]]
  lines[1] = lines[1].replace(b'"prompt"', b'"prompt\xff"')
  path.write_bytes(b"\n".join(lines) + b"\n")
  examples = pipeline.load_examples(_data_cfg(path), "train", data_dir=str(tmp_path / "tfds"))
  assert [e.uid for e in examples] == [0, 2]
  assert any("not UTF-8: [1]" in r.getMessage() for r in caplog.records)


def test_7_corrupt_parquet_is_named(tmp_path):
  bad = tmp_path / "bad.parquet"
  with open(FIXTURE.replace(".jsonl", ".parquet"), "rb") as f:
    bad.write_bytes(f.read()[:200])
  with pytest.raises(demos.DataError, match=re.escape(f"{os.path.realpath(bad)}: not a readable parquet file")):
    pipeline.load_examples(_data_cfg(bad), "train", data_dir=str(tmp_path / "tfds"))


# --- 8: one line for errors outside the config schema -----------------------------------------------------------


def test_8_missing_model_dir_is_one_line(tmp_path):
  _one_line_error(_main(f"--workdir={tmp_path}", "--config.model.hf_dir=/nowhere/Qwen", "--config.train.steps=1"),
                  "/nowhere/Qwen/config.json: file not found")


def test_8_missing_data_path_is_one_line_and_leaves_no_lock(tmp_path):
  workdir = str(tmp_path / "run")
  _one_line_error(_tiny_main(workdir, "--config.data.path=/nowhere/train.parquet"),
                  "/nowhere/train.parquet: demonstration data not found")
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_8_error_inside_a_config_file_keeps_its_reason(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from trapo_jax import config\n\ndef get_config():\n  c = config.base_config()\n"
                  "  c.train.steps = 'many'\n  return c\n")
  line = _one_line_error(_main(f"--config={path}", f"--workdir={tmp_path}/run"), "config error")
  assert f"{path}:5:" in line and "many" in line and "int" in line


def test_8_verbose_shows_the_traceback(tmp_path):
  proc = _main(f"--workdir={tmp_path}", "--config.model.hf_dir=/nowhere/Qwen", "--verbose")
  assert proc.returncode == 2 and "Traceback" in proc.stderr
