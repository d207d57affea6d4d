"""A GCS API server on this machine for the gs:// tests: `gcp-storage-emulator`, in memory, on 127.0.0.1.

`python -m tests.gcs PORT BUCKET` serves until killed. Two GCS behaviours the emulator lacks are added here: an
upload with `ifGenerationMatch=0` (create only if absent: how `paths.create` takes the LOCK, and how TensorStore
creates an OCDBT manifest) is refused with 412 when the object exists, and a download sends the object's generation
in `x-goog-generation` (TensorStore reads it to make its next write conditional on it). Other preconditions (a
non-zero generation) are still ignored: the tests have one writer per object.

`emulator()` starts it on a free port and returns the environment each library needs to reach it (see
trapo_jax/paths.py): the tests set it in their own process and pass it to the CLI processes they start.
"""

from __future__ import annotations

import contextlib
import http
import http.server
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
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
  # The server's log goes to a file, never to a pipe: a pipe nobody reads fills up (a traceback per connection a
  # killed client left behind), and the server then blocks on its next log line while holding its request lock.
  with tempfile.TemporaryFile("w+") as log:
    for _ in range(3):  # the free port may be taken between choosing and binding it
      port = _free_port()
      proc = subprocess.Popen([sys.executable, "-m", "tests.gcs", str(port), BUCKET], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=log)
      deadline = time.monotonic() + _START_SECONDS
      while proc.poll() is None and not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
      if proc.poll() is None and _listening(port):
        break
      proc.kill()
      proc.wait()
    else:
      log.seek(0)
      raise RuntimeError(f"gcp-storage-emulator did not start: {log.read()[-2000:]}")
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


def _with_generation_headers(download):
  """objects.download sending the object's generation in x-goog-generation, as GCS does (TensorStore's conditional
  writes read it)."""
  from gcp_storage_emulator.exceptions import NotFound

  def with_headers(request, response, storage, *args, **kwargs):
    with contextlib.suppress(NotFound):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return download(request, response, storage, *args, **kwargs)

  return with_headers


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  """The emulator's HTTPServer accepts a connection only between requests, with a backlog of 5: TensorStore's and
  gcsfs's concurrent requests on a busy machine then wait on connect until they time out. Here connections are
  accepted at once, and requests are still handled one at a time (Router.handle below)."""
  daemon_threads = True
  request_queue_size = 128


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server as server_lib
  server_lib.server.HTTPServer = _ThreadingServer
  handle, one_at_a_time = server_lib.Router.handle, threading.Lock()  # the emulator's storage is not thread-safe

  def serialized(self, method):
    with one_at_a_time:
      return handle(self, method)

  server_lib.Router.handle = serialized
  # A connection whose request never completes (a client that died mid-upload) must not hold the lock above forever:
  # its read times out, the handler ends, and the other requests go on.
  server_lib.RequestHandler.timeout = 60
  patched = {"insert": _with_create_precondition(server_lib.objects.insert),
             "download": _with_generation_headers(server_lib.objects.download)}
  for name, handler in patched.items():  # the module's own calls (objects.get -> download) and the route table
    setattr(server_lib.objects, name, handler)
  for _, handlers in server_lib.HANDLERS:
    for method, handler in handlers.items():
      if getattr(handler, "__name__", "") in patched and handler.__module__.endswith("objects"):
        handlers[method] = patched[handler.__name__]
  server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
