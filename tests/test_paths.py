"""trapo_jax.paths on a local directory and on gs:// (a local GCS API server, tests/gcs.py)."""

import http.client
import os
import uuid

import pytest

from tests import gcs
from trapo_jax import paths


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("gcs_env")
  return f"gs://{gcs.BUCKET}/paths/{uuid.uuid4().hex}"  # one fresh prefix per test: the server lives for the module


def test_write_replaces_whole_file_and_lists(root):
  path = paths.join(root, "sub", "a.json")
  paths.write(path, "first")
  paths.write(path, b"second")
  assert paths.read_text(path) == "second"
  assert paths.listdir(paths.join(root, "sub")) == ["a.json"]  # no temporary file is left beside it
  assert paths.isfile(path) and paths.isdir(paths.join(root, "sub")) and not paths.exists(paths.join(root, "b"))


def test_append_creates_then_extends(root):
  path = paths.join(root, "metrics.jsonl")
  paths.append(path, "1\n")
  paths.append(path, "2\n")
  assert paths.read_text(path) == "1\n2\n"


def test_create_is_exclusive(root):
  path = paths.join(root, "LOCK")
  assert paths.create(path, "mine")
  assert not paths.create(path, "theirs")
  assert paths.read_text(path) == "mine"
  paths.remove(path)
  assert paths.create(path, "theirs") and paths.read_text(path) == "theirs"


def test_local_copy_follows_the_content(root, tmp_path, monkeypatch):
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
  path = paths.join(root, "w.bin")
  paths.write(path, b"one")
  with open(paths.local_copy(path), "rb") as f:
    assert f.read() == b"one"
  paths.write(path, b"two!")
  local = paths.local_copy(path)
  with open(local, "rb") as f:
    assert f.read() == b"two!"
  assert os.path.isabs(local) and (local == path) == (not paths.is_remote(root))


def test_move_and_rmtree(root):
  paths.write(paths.join(root, "c", "1", "x"), "x")
  paths.write(paths.join(root, "c", "1", "y", "z"), "z")
  paths.move(paths.join(root, "c", "1"), paths.join(root, "d", "1"))
  assert not paths.exists(paths.join(root, "c", "1", "x"))
  assert paths.read_text(paths.join(root, "d", "1", "y", "z")) == "z"
  paths.rmtree(paths.join(root, "d"))
  assert not paths.exists(paths.join(root, "d", "1", "x"))


def test_local_dir_and_upload_dir(root, tmp_path, monkeypatch):
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text("{}")
  (src / "w.safetensors").write_bytes(b"\0" * 10)
  target = paths.join(root, "hf")
  paths.upload_dir(str(src), target)
  local = paths.local_dir(target)
  assert sorted(os.listdir(local)) == ["config.json", "w.safetensors"]
  with open(os.path.join(local, "config.json")) as f:
    assert f.read() == "{}"


def test_signature_changes_with_content(root):
  path = paths.join(root, "d.parquet")
  paths.write(path, b"12")
  before = paths.signature(path)
  paths.write(path, b"345")
  assert before[0] == 2 and paths.signature(path)[0] == 3 and paths.signature(path) != before


def test_listing_sees_another_writers_files(root):
  """A directory listed once still shows a file another process (here another client) writes afterwards."""
  paths.write(paths.join(root, "ckpt", "1"), "")
  assert paths.listdir(paths.join(root, "ckpt")) == ["1"]
  other = paths.join(root, "ckpt", "2")
  if paths.is_remote(root):
    import gcsfs
    gcsfs.GCSFileSystem(skip_instance_cache=True).pipe_file(other.split("://", 1)[1], b"")
  else:
    open(other, "w").close()
  assert paths.listdir(paths.join(root, "ckpt")) == ["1", "2"] and paths.exists(other)


@pytest.mark.parametrize("path,parent", [("runs/x", "runs"), ("x", ""), ("/abs/runs/x/", "/abs/runs"),
                                         ("gs://b/runs/x", "gs://b/runs"), ("gs://b/runs/x/", "gs://b/runs")])
def test_parent_of_local_and_bucket_paths(path, parent):
  assert paths.parent(path) == parent


def test_gcs_server_keeps_serving_after_much_logging(gcs_env):
  """Each request with no route logs an error line: ~100 KiB of them, more than a pipe holds, must not block the
  server (tests/gcs.py logs to a file; a pipe nobody read once wedged a whole run)."""
  port = int(gcs_env["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
  for _ in range(1500):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("DELETE", "/no/such/route/" + "x" * 40)
    assert conn.getresponse().status == 501
    conn.close()
  paths.write(f"gs://{gcs.BUCKET}/after-logging", "ok")
  assert paths.read_text(f"gs://{gcs.BUCKET}/after-logging") == "ok"
