"""The one path layer: every file a run reads or writes, on a local disk or in Google Cloud Storage (`gs://...`).

Paths are strings; a local one is an ordinary path, a remote one a URL. Directories, listings, reads and whole-file
writes go through etils `epath` (which orbax and TFDS use too), with gcsfs (fsspec) as its GCS backend; the few
operations `epath` has no word for (an exclusive create, an object's generation, a recursive move) call gcsfs
directly. Whole-file writes are atomic: locally a temporary file renamed over the target, on GCS one upload (an object
appears whole or not at all). GCS objects are immutable, so an append reads and rewrites the object: fine for the
small files appended to (metrics.jsonl). Libraries that need a real file (safetensors' safe_open, pyarrow,
transformers' tokenizer) get a local copy cached under `~/.cache/trapo_jax/gcs` (or $TRAPO_JAX_CACHE).

Credentials on GCS are the environment's (Application Default Credentials: a TPU VM's service account, or
`gcloud auth application-default login`).

Pointing each library at a test endpoint (what tests/gcs.py sets for its local GCS emulator):
  gcsfs (epath, TFDS, orbax's directory operations, this module): STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT;
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, or gcsfs first asks the bucket's layout over gRPC with a 60 s timeout
    per call, which an emulator never answers.
  TensorStore (orbax's array data): TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT.
  google-cloud-storage (tensorboardX's gs:// event writer): STORAGE_EMULATOR_HOST, and a project
    (GOOGLE_CLOUD_PROJECT=any).
  Metadata-server probes of the auth libraries, kept on loopback: GCE_METADATA_HOST, GCE_METADATA_IP and
    GCE_METADATA_ROOT=127.0.0.1:1 (refused at once), NO_GCE_CHECK=true.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import shutil
from typing import IO, Iterator

from etils import epath
import fsspec
import fsspec.config

CACHE_ENV = "TRAPO_JAX_CACHE"
for _name in ("gcsfs", "fsspec"):  # fsspec logs an INFO line per file opened for reading
  logging.getLogger(_name).setLevel(logging.WARNING)
# Other processes write the same bucket (orbax's threads, the other hosts, a run this process waits on): gcsfs's
# cached listings would hide their files.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://...) rather than a local path."""
  return "://" in str(path)


def join(path: str, *parts: str) -> str:
  return posixpath.join(str(path), *parts) if is_remote(path) else os.path.join(path, *parts)


def absolute(path: str) -> str:
  """The path as other processes and libraries see it: local paths made absolute (symlinks resolved), URLs as is."""
  return str(path) if is_remote(path) else os.path.realpath(path)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip("/"))


def parent(path: str) -> str:
  """The directory holding `path` (gs://b/runs/x -> gs://b/runs; runs/x -> runs; x -> "")."""
  path = str(path).rstrip("/")
  return (posixpath if is_remote(path) else os.path).dirname(path)


def _epath(path: str) -> epath.Path:
  return epath.Path(path)


def _gcs():
  import gcsfs  # pylint: disable=g-import-not-at-top
  return gcsfs.GCSFileSystem()


def _key(path: str) -> str:
  """`gs://bucket/key` -> `bucket/key`, as gcsfs names objects."""
  return str(path).split("://", 1)[1]


def exists(path: str) -> bool:
  return _epath(path).exists()


def isdir(path: str) -> bool:
  return _epath(path).is_dir()


def isfile(path: str) -> bool:
  p = _epath(path)
  return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
  """The names in directory `path`, sorted; [] if it does not exist."""
  p = _epath(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; nothing on GCS, where directories are name prefixes."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Removes a file; a missing one is not an error."""
  with contextlib.suppress(FileNotFoundError):
    _epath(path).unlink()


def rmtree(path: str) -> None:
  """Removes a directory and everything in it; a missing one is not an error."""
  if exists(path):
    _epath(path).rmtree()


def move(src: str, dst: str) -> None:
  """Moves a file or directory tree (on GCS: copies each object, then deletes the originals)."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"move between a local path and a URL: {src} -> {dst}")
  if is_remote(src):
    fs, src, dst = _gcs(), _key(src).rstrip("/"), _key(dst).rstrip("/")
    objects = fs.find(src)  # gcsfs's own mv first tries the moveTo API, which not every GCS server offers
    for obj in objects:
      fs.cp_file(obj, dst + obj[len(src):])
    fs.rm(objects)
  else:
    shutil.move(src, dst)


def signature(path: str) -> tuple[int, int]:
  """(size, version) of a file, changing whenever its content may have: the mtime in ns locally, the object's
  generation on GCS."""
  if not is_remote(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  info = _gcs().info(_key(path))
  return int(info["size"]), int(info["generation"])


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """A file object for reading (r, rb) or writing a whole file at once (w, wb: not atomic, see `write`)."""
  return _epath(path).open(mode)


def read_bytes(path: str) -> bytes:
  return _epath(path).read_bytes()


def read_text(path: str) -> str:
  return _epath(path).read_text()


def write(path: str, data: bytes | str) -> None:
  """Writes a whole file atomically: readers (and a kill) see the old content or the new, never a part."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    _epath(path).write_bytes(data)  # one upload: the object appears when it completes
    return
  makedirs(os.path.dirname(path) or ".")
  tmp = f"{path}.tmp.{os.getpid()}"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def append(path: str, text: str) -> None:
  """Appends to a file (creating it). On GCS the object is read and rewritten whole: for small files only."""
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    write(path, old + text.encode())
    return
  with builtins.open(path, "a") as f:
    f.write(text)


def create(path: str, data: bytes | str) -> bool:
  """Creates `path` holding `data` only if it does not exist: False if it does. Exclusive among any number of
  processes and hosts: O_EXCL locally, an upload with ifGenerationMatch=0 on GCS."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    try:
      _gcs().pipe_file(_key(path), data, mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "trapo_jax", "gcs")


def local_copy(path: str) -> str:
  """A local file with the content of `path`, for libraries that need one: the path itself if local, else a copy in
  the cache, downloaded again only when the object changed (its generation)."""
  if not is_remote(path):
    return path
  size, generation = signature(path)
  digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), digest, f"{generation}_{basename(path)}")
  if os.path.exists(local) and os.path.getsize(local) == size:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.tmp.{os.getpid()}"
  _gcs().get_file(_key(path), tmp)
  os.replace(tmp, local)  # processes sharing the cache each download whole, then rename: never a partial file
  return local


def local_dir(path: str, names: list[str] | None = None) -> str:
  """A local directory holding the files `names` (default: all, not recursive) of directory `path`."""
  if not is_remote(path):
    return path
  names = [n for n in listdir(path) if isfile(join(path, n))] if names is None else names
  digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
  out = os.path.join(cache_dir(), digest, "dir")
  os.makedirs(out, exist_ok=True)
  for name in names:
    target = os.path.join(out, name)
    copy = local_copy(join(path, name))
    if not (os.path.exists(target) and os.path.samefile(copy, target)):
      tmp = f"{target}.tmp.{os.getpid()}"
      os.link(copy, tmp)
      os.replace(tmp, target)
  return out


def _ordered(names: list[str], last: str | None) -> list[str]:
  return sorted(names, key=lambda n: (n == last, n))


def upload_dir(local: str, path: str, *, last: str | None = None) -> None:
  """Copies the files of local directory `local` into directory `path` (a URL or a local path), each atomically
  (on GCS a streamed upload: the object appears when it completes), the file `last` after all others."""
  for name in _ordered(os.listdir(local), last):
    source = os.path.join(local, name)
    if not os.path.isfile(source):
      continue
    if is_remote(path):
      _gcs().put_file(source, _key(join(path, name)))
    else:
      with builtins.open(source, "rb") as f:
        write(join(path, name), f.read())


def download_dir(path: str, local: str, *, last: str | None = None) -> None:
  """Copies the files of directory `path` (not recursive) into local directory `local`, each atomically, the file
  `last` after all others."""
  os.makedirs(local, exist_ok=True)
  for name in _ordered([n for n in listdir(path) if isfile(join(path, n))], last):
    target = os.path.join(local, name)
    tmp = f"{target}.tmp.{os.getpid()}"
    if is_remote(path):
      _gcs().get_file(_key(join(path, name)), tmp)
    else:
      shutil.copyfile(join(path, name), tmp)
    os.replace(tmp, target)


@contextlib.contextmanager
def writing(path: str) -> Iterator[io.BytesIO]:
  """A buffer whose content becomes the file `path` (atomically) when the block ends without an error: for writers
  that want a file object (matplotlib's savefig, numpy's savez)."""
  buffer = io.BytesIO()
  yield buffer
  write(path, buffer.getvalue())

