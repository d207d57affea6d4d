"""A GCS API server on this machine for the gs:// tests: `gcp-storage-emulator`, in memory, on 127.0.0.1.

`python -m tests.gcs PORT BUCKET` serves until killed. The emulator ignores preconditions, so it is run here with the
one the project relies on added: an upload with `ifGenerationMatch=0` (create only if absent, how `paths.create`
takes the LOCK) is refused with 412 when the object exists, as GCS does.

`emulator()` starts it on a free port and returns the environment each library needs to reach it (see
trapo_jax/paths.py): the tests set it in their own process and pass it to the CLI processes they start.
"""

from __future__ import annotations

import contextlib
import http
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "test-bucket"
_START_SECONDS = 30


def environment(port: int) -> dict[str, str]:
  """The variables that point gcsfs (epath, orbax's file ops, TFDS), google-cloud-storage (tensorboardX) and
  TensorStore (orbax's arrays) at the server on `port`."""
  url = f"http://127.0.0.1:{port}"
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs kvstore
      "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "8",
      "GOOGLE_CLOUD_PROJECT": "test",  # google-cloud-storage's client wants a project; the emulator ignores it
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs's gRPC bucket-layout probe: 60 s per call without GCS
      # The auth libraries' metadata-server probes stay on loopback (port 1: refused at once).
      "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1", "GCE_METADATA_ROOT": "127.0.0.1:1",
      "NO_GCE_CHECK": "true",
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _listening(port: int) -> bool:
  with socket.socket() as s:
    s.settimeout(0.5)
    return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def emulator() -> Iterator[dict[str, str]]:
  """Runs the server (a child process) for the duration; yields its environment. Raises if it does not start."""
  for _ in range(3):  # the free port may be taken between choosing and binding it
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs", str(port), BUCKET], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + _START_SECONDS
    while proc.poll() is None and not _listening(port) and time.monotonic() < deadline:
      time.sleep(0.1)
    if proc.poll() is None and _listening(port):
      break
    proc.kill()
    proc.wait()
  else:
    raise RuntimeError(f"gcp-storage-emulator did not start: {proc.stderr.read()[-2000:]}")
  try:
    yield environment(port)
  finally:
    proc.kill()
    proc.wait()


def _with_create_precondition(insert):
  """objects.insert refusing an ifGenerationMatch=0 upload (412) whose object exists."""
  from gcp_storage_emulator.exceptions import NotFound
  lock = threading.Lock()

  def guarded(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") != ["0"]:
      return insert(request, response, storage, *args, **kwargs)
    name = request.query["name"][0] if "name" in request.query else request.data["meta"].get("name")
    with lock:
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
      except NotFound:
        return insert(request, response, storage, *args, **kwargs)
    response.status = http.HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                             "errors": [{"reason": "conditionNotMet", "message": "precondition failed"}]}})

  return guarded


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server as server_lib
  guarded = _with_create_precondition(server_lib.objects.insert)
  server_lib.objects.insert = guarded  # the route table's fallback for uploads without the /upload prefix
  for _, handlers in server_lib.HANDLERS:
    if handlers.get("POST") is not None and handlers["POST"].__name__ == "insert":
      handlers["POST"] = guarded
  server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
