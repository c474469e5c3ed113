"""Folders on a local disk or on an fsspec filesystem of an object store (`s3://bucket/prefix`, `gs://`, ...).

The cache reader and writer and the output-folder claim work on a `Folder`, so recipes only pass a location
through: a local path or a URI. `LocalFolder` does what mdkd always did (temporary file, fsync, rename).
`file://PATH` is the local folder PATH. `ObjectFolder` relies on what an object store does offer instead of rename: an
object appears whole once its upload ends, or not at all. Stage two reads objects through local copies (`copies_root`),
each checked against the sha256 the manifest records before it is used. Credentials and endpoints come from the
filesystem's usual environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS profiles);
errors reaching the store become one-line UserErrors.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mdkd.pipeline.errors import UserError, first_line
from mdkd.pipeline.files import sha256_of_file, sha256_of_folder, write_json_atomic

# The optional extra that brings each protocol's filesystem package.
EXTRAS = {"s3": "s3", "s3a": "s3"}
# Where local copies of objects are kept (content-addressed by sha256, so any cache may share them).
COPIES_VARIABLE = "MDKD_STORE_COPIES"
# Protocols whose URIs name a bucket (or container) first, which must exist before anything is written there.
BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs"}
# A URI of the local filesystem: opened as the plain path it names.
LOCAL_SCHEME = "file://"


def is_uri(location: str | Path) -> bool:
    """Whether a location names a filesystem by protocol (`s3://...`) rather than a local path."""
    return isinstance(location, str) and "://" in location


def location_name(location: str | Path) -> str:
    """How a run record names a location: a URI as given, a local path resolved."""
    return location if is_uri(location) else str(Path(location).resolve())


def open_folder(location: str | Path | Folder) -> Folder:
    if isinstance(location, LocalFolder | ObjectFolder):
        return location
    if isinstance(location, str) and location.startswith(LOCAL_SCHEME):
        # fsspec's local filesystem would write in place, without the temporary name and rename of LocalFolder.
        return LocalFolder(Path(location.removeprefix(LOCAL_SCHEME)))
    return ObjectFolder(location) if is_uri(location) else LocalFolder(Path(location))


def copies_root() -> Path:
    """The local folder holding copies of objects that stage two reads (MDKD_STORE_COPIES, else ~/.cache/mdkd)."""
    configured = os.environ.get(COPIES_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "mdkd" / "store"


class LocalFolder:
    """A folder on this machine's disk."""

    is_local = True

    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def name(self, relative: str) -> str:
        return str(self.path / relative)

    def exists(self, relative: str = "") -> bool:
        return (self.path / relative).exists()

    def size(self, relative: str) -> int | None:
        """The file's size in bytes; None when there is no such file."""
        path = self.path / relative
        return path.stat().st_size if path.is_file() else None

    def read_text(self, relative: str) -> str:
        return (self.path / relative).read_text(encoding="utf-8")

    def write_text(self, relative: str, text: str) -> None:
        (self.path / relative).write_text(text, encoding="utf-8")

    def write_json(self, relative: str, data) -> None:
        write_json_atomic(self.path / relative, data)

    def append_line(self, relative: str, line: str) -> None:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(line + "\n")

    def write_file(self, relative: str, write: Callable[[Path], None]) -> tuple[int, str]:
        """`write(path)` to a temporary name in the final folder, fsync, rename; (bytes, sha256) of the file."""
        final = self.path / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        write(temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        return final.stat().st_size, sha256_of_file(final)

    def write_folder(self, relative: str, save: Callable[[Path], None]) -> str:
        """`save(folder)` into relative (a tokenizer's save_pretrained, say); the sha256 of the folder's files."""
        save(self.path / relative)
        return sha256_of_folder(self.path / relative)

    def remove(self, relative: str) -> None:
        (self.path / relative).unlink(missing_ok=True)

    def remove_tree(self, relative: str) -> None:
        shutil.rmtree(self.path / relative, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Temporary files of an interrupted writer (never under a real name)."""
        for leftover in self.path.rglob(".*.tmp"):
            leftover.unlink()

    def find(self, suffix: str) -> list[str]:
        """Relative paths of the files under the folder whose names end with `suffix`, sorted."""
        return [path.relative_to(self.path).as_posix() for path in sorted(self.path.rglob(f"*{suffix}"))]

    def holds_anything_but(self, names: set[str]) -> bool:
        return self.path.exists() and any(entry.name not in names for entry in self.path.iterdir())

    def empty_except(self, names: set[str]) -> None:
        """Remove every entry but `names` (the folder itself stays, so a symbolic link to it keeps working)."""
        for entry in self.path.iterdir():
            if entry.name in names:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)


class ObjectFolder:
    """A prefix on an fsspec filesystem, as `protocol://bucket/prefix`.

    No renames and no locks: every write is one whole object (uploaded from a local temporary file), so a reader
    sees an object complete or not at all. Listings are never cached, so what another rank wrote is seen."""

    is_local = False

    def __init__(self, uri: str):
        self.protocol, _, path = uri.partition("://")
        self.uri = f"{self.protocol}://{path.rstrip('/')}"
        self.bucket = path.split("/", 1)[0]
        if not self.bucket:
            raise UserError(f"{uri}: name a bucket: {self.protocol}://bucket/prefix")
        self._bucket_seen = False
        with self._reaching():
            from fsspec.core import url_to_fs

            self.fs, self.root = url_to_fs(self.uri, **_options(self.protocol))

    def __str__(self) -> str:
        return self.uri

    def name(self, relative: str) -> str:
        return f"{self.uri}/{relative}"

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def exists(self, relative: str = "") -> bool:
        with self._reaching():
            return self.fs.exists(self._path(relative))

    def size(self, relative: str) -> int | None:
        try:
            with self._reaching():
                info = self.fs.info(self._path(relative))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def kind(self, relative: str = "") -> str | None:
        """What is at `relative`: "file" (an object), "directory" (a prefix holding objects) or None (nothing)."""
        with self._reaching():
            try:
                return self.fs.info(self._path(relative)).get("type")
            except FileNotFoundError:
                return None

    @contextmanager
    def open(self, relative: str = "") -> Iterator[BinaryIO]:
        """The object, streamed for reading; failing to reach the store while it is read is a UserError too."""
        with self._reaching(), self.fs.open(self._path(relative), "rb") as handle:
            yield handle

    def read_bytes(self, relative: str) -> bytes:
        with self._reaching():
            return self.fs.cat_file(self._path(relative))

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self._reaching(writing=True):
            self.fs.pipe_file(self._path(relative), data)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, data) -> None:
        import json

        self.write_bytes(relative, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    def write_file(self, relative: str, write: Callable[[Path], None]) -> tuple[int, str]:
        """`write(path)` to a local temporary file, hashed, then uploaded as one object; (bytes, sha256)."""
        with tempfile.TemporaryDirectory(prefix="mdkd-upload-") as scratch:
            local = Path(scratch) / Path(relative).name
            write(local)
            size, sha256 = local.stat().st_size, sha256_of_file(local)
            with self._reaching(writing=True):
                self.fs.put_file(str(local), self._path(relative))
        return size, sha256

    def write_folder(self, relative: str, save: Callable[[Path], None]) -> str:
        """`save(folder)` into a local temporary folder, then its files uploaded one object each; their sha256."""
        with tempfile.TemporaryDirectory(prefix="mdkd-upload-") as scratch:
            save(Path(scratch))
            files = sorted(path for path in Path(scratch).iterdir() if path.is_file())
            with self._reaching(writing=True):
                for path in files:
                    self.fs.put_file(str(path), self._path(f"{relative}/{path.name}"))
            return sha256_of_folder(Path(scratch))

    def remove(self, relative: str) -> None:
        with self._reaching(writing=True):
            if self.fs.exists(self._path(relative)):
                self.fs.rm_file(self._path(relative))

    def remove_tree(self, relative: str) -> None:
        with self._reaching(writing=True):
            found = self.fs.find(self._path(relative))
            if found:
                self.fs.rm(found)

    def remove_leftovers(self) -> None:
        """Nothing to do: an object store never holds half an upload under a name."""

    def find(self, suffix: str) -> list[str]:
        with self._reaching():
            found = self.fs.find(self.root)
        start = len(self.root.rstrip("/")) + 1
        # An empty name is a zero-byte `prefix/` placeholder (a "folder" made in a console), not an object inside.
        return sorted(path[start:] for path in found if path.endswith(suffix) and path[start:])

    def holds_anything_but(self, names: set[str]) -> bool:
        return any(relative.split("/", 1)[0] not in names for relative in self.find(""))

    def empty_except(self, names: set[str]) -> None:
        """Remove every object under the prefix but those under `names`."""
        doomed = [self._path(relative) for relative in self.find("") if relative.split("/", 1)[0] not in names]
        with self._reaching(writing=True):
            if doomed:
                self.fs.rm(doomed)

    def make(self) -> None:
        """Nothing to do: a prefix exists once it holds an object (the bucket must exist)."""

    def fetch(self, relative: str, sha256: str, reread: bool = False) -> Path | None:
        """A local copy of the object whose bytes hash to `sha256` (the manifest's), downloaded unless a copy is
        kept already (`reread`: download anyway, to check the object itself); None when the object is missing or
        its bytes hash otherwise."""
        copy = copies_root() / "files" / sha256.removeprefix("sha256:")
        if copy.is_file() and not reread:
            return copy
        copy.parent.mkdir(parents=True, exist_ok=True)
        temporary = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
        try:
            with self._reaching():
                self.fs.get_file(self._path(relative), str(temporary))
            if sha256_of_file(temporary) != sha256:
                return None
            os.replace(temporary, copy)
        except FileNotFoundError:
            return None
        finally:
            temporary.unlink(missing_ok=True)
        return copy

    def fetch_folder(self, relative: str, sha256: str) -> Path | None:
        """A local copy of the folder `relative` whose files hash to `sha256` (see `fetch`); None otherwise."""
        copy = copies_root() / "folders" / sha256.removeprefix("sha256:")
        if copy.is_dir():
            return copy
        copy.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{copy.name}.", dir=copy.parent) as scratch:
            try:
                with self._reaching():
                    names = [path.rsplit("/", 1)[-1] for path in self.fs.ls(self._path(relative), detail=False)]
                    for name in names:
                        self.fs.get_file(self._path(f"{relative}/{name}"), str(Path(scratch) / name))
            except FileNotFoundError:
                return None
            if not names:
                return None
            if sha256_of_folder(Path(scratch)) != sha256:
                return None
            try:
                os.rename(scratch, copy)
            except OSError:  # another process on this machine copied it first
                pass
            Path(scratch).mkdir(exist_ok=True)  # for TemporaryDirectory's cleanup
        return copy

    @contextmanager
    def _reaching(self, writing: bool = False) -> Iterator[None]:
        """The filesystem's failures to reach the store as one-line UserErrors; a missing object stays a
        FileNotFoundError (callers decide what it means) unless the bucket is missing or a write needs it."""
        try:
            yield
        except FileNotFoundError as error:
            if not self._has_bucket():
                raise UserError(f"bucket {self.bucket} does not exist at {self._endpoint()}; create it first") from None
            if writing:
                raise UserError(
                    f"cannot write to {self.uri}: {first_line(error)} (create the bucket first, or check the URI)"
                ) from None
            raise
        except ImportError as error:
            extra = EXTRAS.get(self.protocol)
            install = f"pip install 'mdkd[{extra}]'" if extra else first_line(error)
            raise UserError(
                f"{self.uri}: {self.protocol}:// needs a package that is not installed: {install}"
            ) from None
        except PermissionError as error:
            raise UserError(f"access to {self.uri} denied: {first_line(error)} (check the credentials)") from None
        except Exception as error:
            problem = _store_problem(error)
            if problem is None:
                raise
            raise UserError(f"{self.uri}: {problem}") from None

    def _has_bucket(self) -> bool:
        """Whether the bucket exists (asked once a missing object is met, and once only when it does)."""
        if not self._bucket_seen:
            self._bucket_seen = self.protocol not in BUCKET_PROTOCOLS or self.fs.exists(self.bucket)
        return self._bucket_seen

    def _endpoint(self) -> str:
        """Where the store is, for messages: S3's endpoint URL; other filesystems are named by their protocol."""
        try:
            return str(self.fs.s3.meta.endpoint_url)
        except AttributeError:
            return f"{self.protocol}://"


def working_copy(uri: str) -> Path:
    """The local folder in which a folder on a store is worked on (a run trains there), keyed by its URI."""
    key = hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return copies_root() / "working" / key


class Mirror:
    """A local folder kept as the working copy of a prefix on a store (a run folder, say).

    `pull` makes the local folder what the prefix holds (the lock file `keep` stays); `push` uploads the files that
    are new or changed since the last pull or push, one object each, in an order that keeps the store consistent
    at every moment: ordinary files first, then each file named in `records_last` (a checkpoint's record after the
    checkpoint's files, the run's record after everything), and removes the objects whose files are gone."""

    def __init__(self, uri: str, local: Path, records_last: tuple[str, ...], keep: str):
        self.remote = ObjectFolder(uri)
        self.local = local
        self.records_last = records_last
        self.keep = keep
        self._pushed: dict[str, tuple[int, int]] = {}

    def _signature(self, relative: str) -> tuple[int, int]:
        status = (self.local / relative).stat()
        return status.st_size, status.st_mtime_ns

    def _local_files(self) -> list[str]:
        return [
            path.relative_to(self.local).as_posix()
            for path in sorted(self.local.rglob("*"))
            if path.is_file() and path.name != self.keep and not path.name.endswith(".tmp")
        ]

    def pull(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        LocalFolder(self.local).empty_except({self.keep})
        self._pushed = {}
        with self.remote._reaching(writing=True):  # a missing bucket: found now, not at the first upload
            found = self.remote.find("")
        for relative in found:
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.remote._reaching():
                self.remote.fs.get_file(self.remote._path(relative), str(target))
            self._pushed[relative] = self._signature(relative)

    def _upload(self, relative: str) -> None:
        self.remote.fs.put_file(str(self.local / relative), self.remote._path(relative))

    def push(self) -> None:
        files = self._local_files()
        rank = {name: position + 1 for position, name in enumerate(self.records_last)}
        changed = [relative for relative in files if self._pushed.get(relative) != self._signature(relative)]
        changed.sort(key=lambda relative: (rank.get(relative.rsplit("/", 1)[-1], 0), relative))
        with self.remote._reaching(writing=True):
            for relative in changed:
                signature = self._signature(relative)
                self._upload(relative)
                self._pushed[relative] = signature
            gone = sorted(set(self._pushed) - set(files))
            if gone:
                self.remote.fs.rm([self.remote._path(relative) for relative in gone])
            for relative in gone:
                del self._pushed[relative]


def _options(protocol: str) -> dict:
    """Filesystem options: a fresh instance (its settings follow today's environment), no listings cache (other
    ranks write too) and, for S3, bounded timeouts and retries so that an unreachable endpoint fails in seconds."""
    options: dict = {"skip_instance_cache": True, "use_listings_cache": False}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
    return options


def _store_problem(error: Exception) -> str | None:
    """One line for an error that says the store cannot be used as configured; None for any other error."""
    if isinstance(error, ValueError) and "Protocol not known" in str(error):
        return "unknown filesystem protocol (give a local folder or an fsspec URL such as s3://bucket/prefix)"
    try:
        from botocore import exceptions as aws
    except ImportError:
        return f"the store failed: {first_line(error)}" if isinstance(error, OSError) else None
    if isinstance(error, aws.NoCredentialsError | aws.PartialCredentialsError):
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(error, aws.EndpointConnectionError | aws.ConnectTimeoutError | aws.ConnectionError):
        return f"cannot reach the object store ({first_line(error)}); check AWS_ENDPOINT_URL and the network"
    if isinstance(error, aws.ClientError | aws.BotoCoreError | OSError):
        return f"the object store refused the request ({first_line(error)})"
    return None


Folder = LocalFolder | ObjectFolder
