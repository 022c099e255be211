"""One I/O layer over fsspec: every path may be local or ``s3://bucket/prefix``.

Outputs (datasets, semantic-ID tables, exported models) are committed atomically with :func:`commit_dir`: every
file is written to a staging location first and ``manifest.json`` is written last, so a reader that finds a
manifest finds a complete directory, and a failed run leaves neither a manifest nor a half-written directory at
the destination (an existing output there is untouched unless ``overwrite``). On S3, an overwrite first copies the
old output aside (``.<name>.old-<token>`` beside it), so a failure while replacing it names where it is intact.

On S3, every request is tried at most ``storage.max_attempts`` times in all (botocore's standard retry is the only
retry layer), so an endpoint that goes away ends the run with a :class:`StorageError` naming the destination and
the endpoint after a bounded number of connection attempts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import polars as pl

from genrec_dist.errors import GenrecError

MANIFEST = "manifest.json"


class StorageError(GenrecError, RuntimeError):
    """A path that cannot be read or written: the message names the path and the reason."""


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


def _options(storage: Any | None) -> S3Options:
    if storage is None:
        return S3Options()
    return S3Options(
        endpoint_url=getattr(storage, "endpoint_url", ""),
        region=getattr(storage, "region", ""),
        max_attempts=getattr(storage, "max_attempts", 3),
        connect_timeout_s=getattr(storage, "connect_timeout_s", 5.0),
        read_timeout_s=getattr(storage, "read_timeout_s", 60.0),
    )


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def endpoint_url(storage: Any | None = None) -> str:
    opts = _options(storage)
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def s3fs_kwargs(storage: Any | None = None, max_attempts: int | None = None) -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem``: endpoint and region from the config or the environment,
    bounded retries and timeouts. Credentials come from botocore's standard chain and are never copied here.
    ``max_attempts`` overrides ``storage.max_attempts`` (best-effort cleanup tries once)."""
    opts = _options(storage)
    attempts = max(1, max_attempts if max_attempts is not None else opts.max_attempts)
    client: dict[str, Any] = {}
    if url := endpoint_url(storage):
        client["endpoint_url"] = url
    region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    return {
        "client_kwargs": client,
        "config_kwargs": {
            "connect_timeout": opts.connect_timeout_s,
            "read_timeout": opts.read_timeout_s,
            # botocore's plain ``max_attempts`` counts *retries* (3 -> 4 tries); ``total_max_attempts`` counts tries.
            "retries": {"total_max_attempts": attempts, "mode": "standard"},
        },
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def filesystem(path: str, storage: Any | None = None, max_attempts: int | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem names it."""
    path = str(path)
    if path.startswith("s3://") or path.startswith("s3a://"):
        import s3fs

        fs = s3fs.S3FileSystem(**s3fs_kwargs(storage, max_attempts))
        # s3fs wraps every botocore call in its own retry loop (class default 5 tries, not a constructor argument)
        # that also retries dropped connections, so against a dead endpoint the tries multiplied: 5 x 4 = 20 per
        # request and ~20 s of back-off (measured with tests/_util.FaultProxy). One retry layer only. (aiohttp
        # still resends an idempotent request once on a dropped connection: at most 2 connections per try.)
        fs.retries = 1
        return fs, path.split("://", 1)[1]
    if is_remote(path):
        fs, fs_path = fsspec.core.url_to_fs(path)
        return fs, fs_path
    if path.startswith("file://"):
        path = path[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(path)


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *[p.strip("/") for p in parts]])


@contextlib.contextmanager
def _guard(path: str, storage: Any | None = None) -> Iterator[None]:
    """Turn endpoint and permission failures deep inside botocore/s3fs into one error naming the path."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the path and endpoint named
        if not is_remote(path):
            raise
        where = endpoint_url(storage) or "the default AWS endpoint"
        raise StorageError(f"{path}: storage at {where} failed: {type(exc).__name__}: {exc}") from exc


def exists(path: str, storage: Any | None = None) -> bool:
    fs, p = filesystem(path, storage)
    with _guard(path, storage):
        return fs.exists(p)


def read_bytes(path: str, storage: Any | None = None) -> bytes:
    fs, p = filesystem(path, storage)
    with _guard(path, storage):
        with fs.open(p, "rb") as fh:
            return fh.read()


def write_bytes(path: str, data: bytes, storage: Any | None = None) -> None:
    """Write one file whole or not at all: locally to a temporary name beside it, then renamed over it (a crash
    leaves the old file or none, never half of one); on S3 one PUT, which is atomic per object."""
    fs, p = filesystem(path, storage)
    with _guard(path, storage):
        if is_remote(path):
            with fs.open(p, "wb") as fh:
                fh.write(data)
            return
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


@contextlib.contextmanager
def open_file(path: str, storage: Any | None = None, mode: str = "rb") -> Iterator[Any]:
    """An open file object for ``path`` (ranged reads on S3: a Parquet footer is read without the whole file)."""
    fs, p = filesystem(path, storage)
    with _guard(path, storage), fs.open(p, mode) as fh:
        yield fh


def copy_file(src: str, dst: str, storage: Any | None = None, move: bool = False) -> None:
    """Copy (or move) one file, never through memory whole: a rename or server-side copy when both paths are on
    the same store, else streamed in 8 MiB pieces. Local destinations are written under a temporary name first."""
    sfs, sp = filesystem(src, storage)
    dfs, dp = filesystem(dst, storage)
    with _guard(dst, storage):
        if not is_remote(src) and not is_remote(dst):
            os.makedirs(os.path.dirname(dp), exist_ok=True)
            if move:
                os.replace(sp, dp)
                return
            tmp = os.path.join(os.path.dirname(dp), f".{os.path.basename(dp)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                shutil.copyfile(sp, tmp)
                os.replace(tmp, dp)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            return
        if type(sfs) is type(dfs) and is_remote(src):
            sfs.copy(sp, dp)  # server-side
        else:
            if not is_remote(dst):
                os.makedirs(os.path.dirname(dp), exist_ok=True)
            with sfs.open(sp, "rb") as fi, dfs.open(dp, "wb") as fo:
                while chunk := fi.read(8 << 20):
                    fo.write(chunk)
        if move:
            sfs.rm(sp)


def read_json(path: str, storage: Any | None = None) -> Any:
    return json.loads(read_bytes(path, storage).decode("utf-8"))


def read_parquet(path: str, storage: Any | None = None, columns: list[str] | None = None) -> pl.DataFrame:
    fs, p = filesystem(path, storage)
    with _guard(path, storage):
        with fs.open(p, "rb") as fh:
            return pl.read_parquet(fh, columns=columns)


def parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    # Statistics off and a fixed compression keep the bytes a pure function of the table (local == s3 runs).
    df.write_parquet(buf, compression="zstd", statistics=False)
    return buf.getvalue()


def list_files(path: str, storage: Any | None = None, suffix: str = "") -> list[str]:
    """Files directly under ``path`` whose name ends with ``suffix``, sorted, as full paths like ``path``."""
    fs, p = filesystem(path, storage)
    with _guard(path, storage):
        names = sorted(os.path.basename(n) for n in fs.ls(p, detail=False))
    return [join(path, n) for n in names if n.endswith(suffix)]


def require_manifest(path: str, storage: Any | None = None) -> dict:
    """The manifest of a committed output; a directory without one is refused (it may be half-written)."""
    mpath = join(path, MANIFEST)
    if not exists(mpath, storage):
        raise StorageError(
            f"{path}: no {MANIFEST} here, so this is not a committed output (missing, or a run that failed "
            f"before committing). Run the job that writes it first."
        )
    return read_json(mpath, storage)


class StagedDir:
    """Files of one output written to a staging location; ``manifest`` is set by the caller and written last."""

    def __init__(self, final: str, staging: str, storage: Any | None):
        self.final = final
        self.staging = staging
        self.storage = storage
        self.files: list[str] = []
        self.manifest: dict | None = None

    def path(self, name: str) -> str:
        """The staging path of ``name`` (for writers that need a path, e.g. torch.save through fsspec)."""
        return join(self.staging, name)

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            write_bytes(self.path(name), data, self.storage)
        except StorageError as exc:  # name the output the caller asked for, not only the staging file
            raise StorageError(f"{self.final}: writing {name} failed, nothing was committed: {exc}") from exc
        self.files.append(name)

    def adopt(self, name: str, src: str, move: bool = False) -> None:
        """Put the file at ``src`` (written elsewhere, e.g. by Ray workers) into the output as ``name``, without
        reading it into this process: a rename or server-side copy where the stores allow it."""
        try:
            copy_file(src, self.path(name), self.storage, move=move)
        except (StorageError, OSError) as exc:
            raise StorageError(f"{self.final}: adding {name} from {src} failed, nothing was committed: {exc}") from exc
        self.files.append(name)

    def write_parquet(self, name: str, df: pl.DataFrame) -> None:
        self.write_bytes(name, parquet_bytes(df))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))


@contextlib.contextmanager
def commit_dir(path: str, storage: Any | None = None, overwrite: bool = False) -> Iterator[StagedDir]:
    """Write an output directory atomically.

    >>> with commit_dir("out/dataset") as out:      # doctest: +SKIP
    ...     out.write_parquet("items.parquet", items)
    ...     out.manifest = {"schema_version": 1}

    Refuses (before writing anything) when ``path`` already holds files and ``overwrite`` is false. A failed
    write removes its staging area if the storage still answers; staging areas a failure could not remove (the
    endpoint went away, the process was killed) are removed by the next successful commit to the same ``path``.
    """
    path = str(path).rstrip("/")
    fs, final = filesystem(path, storage)
    with _guard(path, storage):
        present = fs.exists(final) and bool(fs.ls(final, detail=False))
    if present and not overwrite:
        raise StorageError(f"{path}: already exists (pass overwrite=true to replace it)")
    token = uuid.uuid4().hex[:12]
    parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    staging = join(parent, f".{name}.staging-{token}")
    staged = StagedDir(path, staging, storage)
    try:
        yield staged
        if staged.manifest is None:
            raise StorageError(f"{path}: internal error: output closed without a manifest")
        staged.write_json(MANIFEST, staged.manifest)
        with _guard(path, storage):
            if is_remote(path):
                _commit_remote(fs, staged, final, present, token)
            else:
                _commit_local(staged, final, present, token)
    except BaseException:
        # Best effort, one try per request: the endpoint may be the reason we are here, and leftovers are
        # removed by the next successful commit (below).
        _remove_quietly(staging, storage, max_attempts=1)
        raise
    _remove_leftovers(parent, name, storage)


def _commit_local(staged: StagedDir, final: str, present: bool, token: str) -> None:
    _, staging = filesystem(staged.staging)
    if present:
        old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{token}")
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.isdir(final):  # an empty directory left by someone: replace it
            os.rmdir(final)
        os.rename(staging, final)


def _commit_remote(fs: fsspec.AbstractFileSystem, staged: StagedDir, final: str, present: bool, token: str) -> None:
    # Object stores cannot rename a prefix: invalidate the old output (manifest first), copy the new files,
    # and write the manifest last. A reader in between sees no manifest and refuses the directory.
    # An old output is first copied aside (server-side copies, its manifest last), so an endpoint that goes away
    # between removing it and completing the new one loses neither: the error names where the old one is intact.
    _, staging = filesystem(staged.staging, staged.storage)
    backup = None
    if present:
        parent, name = final.rstrip("/").rsplit("/", 1)
        backup = f"{parent}/.{name}.old-{token}"
        _copy_tree(fs, final, backup)
        if fs.exists(f"{final}/{MANIFEST}"):
            fs.rm(f"{final}/{MANIFEST}")
        fs.rm(final, recursive=True)
    try:
        for name in staged.files:
            if name != MANIFEST:
                fs.copy(f"{staging}/{name}", f"{final}/{name}")
        fs.copy(f"{staging}/{MANIFEST}", f"{final}/{MANIFEST}")
    except Exception as exc:
        if backup is None:
            raise
        scheme = staged.final.split("://", 1)[0]
        where = endpoint_url(staged.storage) or "the default AWS endpoint"
        raise StorageError(f"{staged.final}: replacing the output failed at {where}, nothing new was committed; the "
                           f"previous output is intact at {scheme}://{backup} (copy it back, or commit again): "
                           f"{type(exc).__name__}: {exc}") from exc
    if backup is not None:
        fs.rm(backup, recursive=True)
    fs.rm(staging, recursive=True)


def _copy_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Copy every object under ``src`` to ``dst`` (same relative names), the manifest last."""
    files = sorted(fs.find(src), key=lambda p: p.endswith("/" + MANIFEST))
    for f in files:
        fs.copy(f, dst + f[len(src.rstrip("/")):])


def remove_tree(path: str, storage: Any | None = None) -> None:
    """Remove a file or folder if it is there (best effort: a temporary area must not hide the real error)."""
    _remove_quietly(path, storage)


def _remove_quietly(path: str, storage: Any | None, max_attempts: int | None = None) -> None:
    try:
        fs, p = filesystem(path, storage, max_attempts)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except Exception:  # noqa: BLE001 - cleanup of a staging area must not hide the original error
        pass


def _remove_leftovers(parent: str, name: str, storage: Any | None) -> None:
    """Remove staging (and local ``.old``) areas of ``name`` that earlier failed commits left in ``parent``.

    Runs after a successful commit, which has just replaced the output, so no earlier writer of this output can
    still need its staging area (concurrent writers of one output are not supported: the last commit wins)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(staging|old)-[0-9a-f]{{12}}")
    try:
        fs, p = filesystem(parent, storage)
        entries = fs.ls(p, detail=False)
    except Exception:  # noqa: BLE001 - the output is committed; leftovers are only untidy
        return
    for entry in entries:
        if pattern.fullmatch(os.path.basename(entry.rstrip("/"))):
            _remove_quietly(join(parent, os.path.basename(entry.rstrip("/"))), storage)
