"""Sharded parquet output for teacher generations: crash-safe, resumable, never mixes configs,
and shared by several workers that split one run's prompts.

Layout of an output directory:
  shard-00000.parquet, ...        a single writer (workers: 1)
  shard-w001-00000.parquet, ...   worker 1 of several: each worker numbers its own shards
  manifest.json                   config + fingerprint, shard list, run metadata (one per dir)
  .llmkd-lock                     serialises shard renames and manifest updates across workers

The shards are the source of truth (the manifest is rebuilt from them), so a run killed at any
moment leaves only whole shards plus, at worst, a temp file that the next run deletes. Nothing is
created before the first shard or the final manifest: a run that fails before generating leaves no
directory behind, and a directory without shards (an older failed run's manifest) never blocks a
rerun. Keys of rows that were generated but filtered out (e.g. wrong answers) go into the parquet
metadata of the next shard, so a rerun skips them too; a batch whose rows were all dropped writes
an empty shard. Every shard carries the config (and its fingerprint) in its parquet metadata: a
directory never holds two configs, and the error names the fields that differ.
Top-k ids are stored as int32 and log-probs as float32 (float16 would round log-probs near -10 by
~0.01, which is the same order as the tail mass that sparse KD relies on).
Every page carries a CRC checksum, verified when the rows are loaded for training: a damaged shard
(flipped or zeroed bytes, a truncated copy) is one error naming the file, never silently wrong
log-probs. Shards written before checksums still load (unverified).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmkd.fsutil import disk_full
from llmkd.generation import codec

MANIFEST = "manifest.json"
LOCK = ".llmkd-lock"
SHARD_GLOB = "shard-*.parquet"
SHARD_NAME = re.compile(r"^shard-(?:w(\d+)-)?(\d+)\.parquet$")
TMP_MARK = ".tmp-"
if TYPE_CHECKING:
    from datasets import Dataset

FINGERPRINT_KEY = b"llmkd_fingerprint"
CONFIG_KEY = b"llmkd_config"
DROPPED_KEY = b"llmkd_dropped"


def fingerprint(config: dict[str, Any]) -> str:
    """Stable hash of the settings that determine the rows (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'temperature: 0.0 there, 0.7 here; ...' for the fields whose values differ."""
    new = json.loads(json.dumps(new, default=str))   # compare as stored (JSON)
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    return "; ".join(f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} here" for k in keys)


def _shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(SHARD_GLOB) if SHARD_NAME.match(p.name))


class ShardWriter:
    """Buffer rows and write them as fixed-size parquet shards under `out_dir`.

    `config` is what the rows depend on (its fingerprint guards the directory); `key_columns`
    identify a row so `done_keys()` lets a rerun skip finished work. With `workers` > 1, worker
    `worker` writes `shard-wNNN-*` files only, so workers on several machines can share one dir.
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], schema: pa.Schema, *,
                 shard_size: int = 256, key_columns: tuple[str, ...] = ("id", "sample"),
                 worker: int = 0, workers: int = 1) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: must be >= 1")
        if workers < 1 or not 0 <= worker < workers:
            raise ValueError(f"worker={worker}, workers={workers}: need workers >= 1 and "
                             "0 <= worker < workers")
        self.out_dir = Path(out_dir)
        self.config = config
        self.fingerprint = fingerprint(config)
        self.schema = schema.with_metadata({FINGERPRINT_KEY: self.fingerprint.encode(),
                                            CONFIG_KEY: json.dumps(config, sort_keys=True, default=str).encode()})
        self.shard_size = shard_size
        self.key_columns = key_columns
        self.worker, self.workers = worker, workers
        self.prefix = "shard-" if workers == 1 else f"shard-w{worker:03d}-"
        self._tag = f"{socket.gethostname()}-{os.getpid()}"    # temp names unique across nodes
        self.metadata: dict[str, Any] = {}
        self._buffer: list[dict[str, Any]] = []
        self._dropped: list[list] = []
        self._known: dict[str, tuple[int, int]] = {}          # shard name -> (rows, dropped keys)
        self._check_dir()
        own = [SHARD_NAME.match(p.name) for p in _shards(self.out_dir) if p.name.startswith(self.prefix)]
        self._next = 1 + max((int(m.group(2)) for m in own if m), default=-1)

    # -- directory ownership ------------------------------------------------------------------
    def _check_dir(self) -> None:
        """Check, without creating anything, that the dir is free or holds this config."""
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"output_dir {str(d)!r} is a file; choose a directory path")
        if not d.exists():
            parent = next(p for p in d.absolute().parents if p.exists())
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise FileExistsError(f"output_dir {str(d)!r} cannot be created ({str(parent)!r} is not "
                                      "a writable directory); choose a writable output_dir")
            return
        # a partial shard of a killed run: never renamed, so never counted. With several workers
        # each deletes only its own (another worker may be writing one right now).
        mine = f"*{TMP_MARK}*" if self.workers == 1 else f"{self.prefix}*{TMP_MARK}*"
        for tmp in d.glob(mine):
            tmp.unlink(missing_ok=True)
        shards = _shards(d)
        manifest = d / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"output_dir {str(d)!r}: {MANIFEST} is not valid JSON ({err}); "
                                 "it is not an llmkd generation dir: choose another output_dir") from err
            if shards:   # a manifest without shards (a run that failed early) never blocks
                self._check_fingerprint(found.get("fingerprint"), found.get("config"), manifest)
                self.metadata = found.get("metadata", {})
        elif not shards and any(p.name != LOCK and TMP_MARK not in p.name for p in d.iterdir()):
            raise FileExistsError(f"output_dir {str(d)!r} is not empty and has no {MANIFEST}; "
                                  "refusing to write into it: choose an empty or new output_dir")
        self._check_shards(shards)

    def _check_shards(self, shards: list[Path]) -> None:
        for shard in shards:
            if shard.name in self._known:
                continue
            f = open_shard(shard)
            meta = f.schema_arrow.metadata or {}
            config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
            self._check_fingerprint(meta.get(FINGERPRINT_KEY, b"?").decode(), config, shard)
            self._known[shard.name] = (f.metadata.num_rows,
                                       len(json.loads(meta.get(DROPPED_KEY, b"[]"))))

    def _check_fingerprint(self, found: str | None, config: dict | None, where: Path) -> None:
        if found == self.fingerprint:
            return
        what = config_diff(config, self.config) if isinstance(config, dict) else \
            f"fingerprint {found}, this config: {self.fingerprint}"
        raise ValueError(
            f"output_dir {str(self.out_dir)!r} holds generations of a different config "
            f"({where.name}: {what}); two configs are never mixed in one dir: use another "
            "output_dir, or delete the old one")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes (and nodes, on file systems with flock support)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- reading what is on disk ---------------------------------------------------------------
    def done_keys(self) -> set[tuple]:
        """Keys of rows already on disk, written or dropped, by any worker (resume skips them)."""
        keys = set(self.dropped_keys())
        for shard in _shards(self.out_dir):
            table = pq.read_table(shard, columns=list(self.key_columns))
            keys.update(zip(*(table.column(c).to_pylist() for c in self.key_columns)))
        return keys

    def dropped_keys(self) -> list[tuple]:
        """Keys that were generated and filtered out, as recorded in the shards' metadata."""
        out: list[tuple] = []
        for shard in _shards(self.out_dir):
            meta = pq.read_schema(shard).metadata or {}
            out += [tuple(k) for k in json.loads(meta.get(DROPPED_KEY, b"[]"))]
        return out

    def read_column(self, name: str) -> list:
        """One column over all shards on disk (for run totals; no `datasets` cache involved)."""
        return [v for shard in _shards(self.out_dir)
                for v in pq.read_table(shard, columns=[name]).column(name).to_pylist()]

    # -- writing ----------------------------------------------------------------------------------
    def add(self, rows: list[dict[str, Any]], dropped: list[tuple] = ()) -> None:
        """Buffer `rows`; `dropped` = keys generated but filtered out (recorded, not written)."""
        self._dropped.extend(list(k) for k in dropped)
        self._buffer.extend(rows)
        while len(self._buffer) >= self.shard_size:
            self._write(self._buffer[:self.shard_size])
            self._buffer = self._buffer[self.shard_size:]

    def flush(self) -> None:
        """Write buffered rows now (a short shard), e.g. after each generation batch."""
        if self._buffer or self._dropped:
            self._write(self._buffer)
            self._buffer = []

    def _write(self, rows: list[dict[str, Any]]) -> None:
        path = self.out_dir / f"{self.prefix}{self._next:05d}.parquet"
        tmp = path.with_name(f"{path.name}{TMP_MARK}{self._tag}")
        schema = self.schema.with_metadata({**self.schema.metadata,
                                            DROPPED_KEY: json.dumps(self._dropped).encode()})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        floats, others = _leaf_paths(schema)
        # byte-stream-split float columns (top-k log-probs, tail mass): lossless, a third smaller
        # compact top-k blocks (binary): zstd's high level buys ~9 % of the shard, at small cost
        level = {f.name: 19 for f in schema if pa.types.is_binary(f.type)} or None
        try:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd",
                           compression_level=level, use_byte_stream_split=floats, use_dictionary=others,
                           write_page_checksum=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            full = disk_full(err, self.out_dir, f"shard {path.name} (the shards before it are complete)")
            if full:
                raise full from None
            raise
        with self._locked():
            try:   # another process may have started writing a different config meanwhile
                self._check_shards(_shards(self.out_dir))
            except ValueError:
                tmp.unlink()
                raise
            os.replace(tmp, path)
            self._write_manifest_locked()
        self._dropped = []
        self._next += 1

    def _write_manifest_locked(self, totals: Callable[[], dict] | None = None) -> None:
        path = self.out_dir / MANIFEST
        for stale in self.out_dir.glob(f"{MANIFEST}{TMP_MARK}*"):   # nobody else holds the lock
            stale.unlink(missing_ok=True)
        shards = _shards(self.out_dir)
        self._check_shards(shards)
        metadata: dict[str, Any] = {}
        if path.exists():   # what other workers recorded (same config: checked above)
            try:
                old = json.loads(path.read_text())
                if old.get("fingerprint") == self.fingerprint:
                    metadata = old.get("metadata", {})
            except json.JSONDecodeError:
                pass
        _merge(metadata, self.metadata)
        if totals is not None:
            metadata["totals"] = totals()
        manifest = {"fingerprint": self.fingerprint, "config": self.config,
                    "shards": [{"file": p.name, "rows": self._known[p.name][0]} for p in shards],
                    "rows": sum(self._known[p.name][0] for p in shards),
                    "dropped": sum(self._known[p.name][1] for p in shards), "metadata": metadata}
        tmp = path.with_name(f"{MANIFEST}{TMP_MARK}{self._tag}")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, path)

    def close(self, totals: Callable[[], dict] | None = None, **metadata: Any) -> None:
        """Flush, then write the manifest with `metadata`; `totals()` (counts over everything on
        disk) is evaluated under the lock, after every shard another worker has finished."""
        self.flush()
        _merge(self.metadata, metadata)
        with self._locked():
            self._write_manifest_locked(totals)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: per-worker entries of several workers accumulate."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        if _shards(Path(out_dir)):
            raise FileNotFoundError(
                f"{str(path)!r} not found, but {str(out_dir)!r} holds generated shards: rerun `llmkd "
                "generate` with the config that wrote them to rebuild it (finished rows are kept)")
        raise FileNotFoundError(f"{str(path)!r} not found; is {str(out_dir)!r} an `llmkd generate` "
                                "output_dir?")
    return json.loads(path.read_text())


def is_generation_dir(path: str | Path) -> bool:
    """A dir `llmkd generate` wrote: a manifest, or shards whose manifest was lost."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST).exists() or bool(_shards(p)))


def load_generated(out_dir: str | Path) -> Dataset:
    """All rows of a generation dir as one `datasets.Dataset` (shard order = name order), once
    every shard's checksums and config (one top-k size) are checked."""
    from datasets import load_dataset

    read_manifest(out_dir)
    shards = _shards(Path(out_dir))
    check_one_config(shards)
    # a shard can be empty (every row of a batch filtered out; it still records the skipped
    # keys for resume); the parquet loader rejects empty files, so leave those out
    files = [str(p) for p in shards if verify_shard(p) > 0]
    if not files:
        raise ValueError(f"generation dir {str(out_dir)!r} has no shards yet; run `llmkd generate`")
    rows = load_dataset("parquet", data_files=files, split="train")
    if codec.COLUMNS[0] in rows.column_names:   # cache: compact -> the columns the loss reads
        rows = codec.decode_dataset(rows, f"generation dir {str(out_dir)!r}")
    return rows


def stored_cache(out_dir: str | Path) -> str | None:
    """The top-k codec of the shards in `out_dir` ("compact" or "lossless"), None if it has none."""
    shards = _shards(Path(out_dir))
    if not shards:
        return None
    return "compact" if codec.COLUMNS[0] in open_shard(shards[0]).schema_arrow.names else "lossless"


def open_shard(path: Path, *, verify: bool = False) -> pq.ParquetFile:
    """The shard's parquet file; a truncated or unreadable one is a ValueError naming it."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=verify)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(_damaged(path, err)) from err


def verify_shard(path: Path) -> int:
    """Read every page of the shard, checking its CRC (a page written without one is read, not
    checked), and return its row count. A damaged shard is a ValueError naming the file."""
    f = open_shard(path, verify=True)
    try:
        for group in range(f.num_row_groups):
            f.read_row_group(group)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(_damaged(path, err)) from err
    return f.metadata.num_rows


def _damaged(path: Path, err: Exception) -> str:
    return (f"generated shard {str(path)!r} is damaged ({str(err).splitlines()[0]}); delete it and rerun "
            "`llmkd generate` with the same config to write its rows again")


def check_one_config(shards: list[Path]) -> None:
    """One config per dataset, as the writer guarantees; shards copied in from another run are
    refused at load, mixed top-k sizes by name (the collator would pad to the first row's k,
    or crash)."""
    groups: dict[bytes, tuple[dict, list[str]]] = {}
    for shard in shards:
        meta = open_shard(shard).schema_arrow.metadata or {}
        if FINGERPRINT_KEY in meta:
            config = json.loads(meta.get(CONFIG_KEY, b"{}"))
            groups.setdefault(meta[FINGERPRINT_KEY], (config, []))[1].append(shard.name)
    if len(groups) < 2:
        return
    where = str(shards[0].parent)
    named = [(c, ", ".join(f[:3]) + (f" and {len(f) - 3} more" if len(f) > 3 else "")) for c, f in groups.values()]
    if len({json.dumps(c.get("topk")) for c, _ in named}) > 1:
        found = "; ".join(f"k={c.get('topk', '?')} in {files}" for c, files in named)
        raise ValueError(f"generated shards of different top-k in {where!r} ({found}); one dataset "
                         "holds one k: keep each generation in its own output_dir")
    (a, a_files), (b, b_files) = named[:2]
    raise ValueError(f"generated shards of different configs in {where!r} ({a_files} vs {b_files}: "
                     f"{config_diff(a, b)}); keep each generation in its own output_dir")


def _leaf_paths(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """Parquet leaf column paths ("col.list.element" inside lists), floating-point ones first."""
    floats: list[str] = []
    others: list[str] = []

    def walk(t: pa.DataType, path: str) -> None:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            walk(t.value_type, f"{path}.list.element")
        elif pa.types.is_struct(t):
            for child in t:
                walk(child.type, f"{path}.{child.name}")
        elif not pa.types.is_binary(t):   # binary: compact blocks, all distinct (no dictionary)
            (floats if pa.types.is_floating(t) else others).append(path)

    for f in schema:
        walk(f.type, f.name)
    return floats, others
