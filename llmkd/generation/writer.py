"""Sharded parquet output for teacher generations: crash-safe, resumable, never mixes configs.

Layout of an output directory:
  shard-00000.parquet, shard-00001.parquet, ...   each written to a temp name, then `os.replace`d
  manifest.json                                   config + fingerprint, shard list, run metadata

The shards are the source of truth (the manifest is rebuilt from them), so a run killed at any
moment leaves only whole shards plus, at worst, a temp file that the next run deletes. Keys of rows
that were generated but filtered out (e.g. wrong answers) go into the parquet metadata of the next
shard, so a rerun skips them too; a batch whose rows were all dropped writes an empty shard. Every shard
carries the config fingerprint in its parquet metadata: a directory never holds two configs.
Top-k ids are stored as int32 and log-probs as float32 (float16 would round log-probs near -10 by
~0.01, which is the same order as the tail mass that sparse KD relies on).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
TMP_MARK = ".tmp-"
if TYPE_CHECKING:
    from datasets import Dataset

FINGERPRINT_KEY = b"llmkd_fingerprint"
DROPPED_KEY = b"llmkd_dropped"


def fingerprint(config: dict[str, Any]) -> str:
    """Stable hash of the settings that determine the rows (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(SHARD_GLOB) if TMP_MARK not in p.name)


class ShardWriter:
    """Buffer rows and write them as fixed-size parquet shards under `out_dir`.

    `config` is what the rows depend on (its fingerprint guards the directory); `key_columns`
    identify a row so `done_keys()` lets a rerun skip finished work.
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], schema: pa.Schema, *,
                 shard_size: int = 256, key_columns: tuple[str, ...] = ("id", "sample")) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: must be >= 1")
        self.out_dir = Path(out_dir)
        self.config = config
        self.fingerprint = fingerprint(config)
        self.schema = schema.with_metadata({FINGERPRINT_KEY: self.fingerprint.encode()})
        self.shard_size = shard_size
        self.key_columns = key_columns
        self.metadata: dict[str, Any] = {}
        self._buffer: list[dict[str, Any]] = []
        self._dropped: list[list] = []
        self._prepare_dir()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in _shards(self.out_dir)), default=-1)
        self.write_manifest()

    def _prepare_dir(self) -> None:
        """Create the dir, or check that it belongs to this config; drop leftover temp files."""
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"output_dir {str(d)!r} is a file; choose a directory path")
        d.mkdir(parents=True, exist_ok=True)
        for tmp in d.glob(f"*{TMP_MARK}*"):
            tmp.unlink()  # partial shard/manifest from a killed run: never renamed, so never counted
        manifest = d / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text()).get("fingerprint")
            except json.JSONDecodeError as err:
                raise ValueError(f"output_dir {str(d)!r}: {MANIFEST} is not valid JSON ({err}); "
                                 "it is not an llmkd generation dir: choose another output_dir") from err
            self._check_fingerprint(found, manifest)
            self.metadata = json.loads(manifest.read_text()).get("metadata", {})  # keep until replaced
        elif any(d.iterdir()):
            raise FileExistsError(f"output_dir {str(d)!r} is not empty and has no {MANIFEST}; "
                                  "refusing to write into it: choose an empty or new output_dir")
        for shard in _shards(d):
            meta = pq.read_schema(shard).metadata or {}
            self._check_fingerprint(meta.get(FINGERPRINT_KEY, b"?").decode(), shard)

    def _check_fingerprint(self, found: str | None, where: Path) -> None:
        if found != self.fingerprint:
            raise ValueError(
                f"output_dir {str(self.out_dir)!r} holds generations of a different config "
                f"({where.name}: fingerprint {found}, this config: {self.fingerprint}); two configs "
                "are never mixed in one dir: use another output_dir, or delete the old one")

    def done_keys(self) -> set[tuple]:
        """Keys of rows already on disk, written or dropped (resume skips them)."""
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
        path = self.out_dir / f"shard-{self._next:05d}.parquet"
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
        schema = self.schema.with_metadata({**self.schema.metadata,
                                            DROPPED_KEY: json.dumps(self._dropped).encode()})
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
        os.replace(tmp, path)
        self._dropped = []
        self._next += 1
        self.write_manifest()

    def write_manifest(self, **metadata: Any) -> None:
        """Rewrite manifest.json from the shards on disk, merging in run `metadata`."""
        self.metadata.update(metadata)
        shards = [{"file": p.name, "rows": pq.read_metadata(p).num_rows} for p in _shards(self.out_dir)]
        manifest = {"fingerprint": self.fingerprint, "config": self.config, "shards": shards,
                    "rows": sum(s["rows"] for s in shards), "dropped": len(self.dropped_keys()),
                    "metadata": self.metadata}
        _atomic_write_text(self.out_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))

    def close(self, **metadata: Any) -> None:
        self.flush()
        self.write_manifest(**metadata)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found; is {str(out_dir)!r} an `llmkd generate` "
                                "output_dir?")
    return json.loads(path.read_text())


def load_generated(out_dir: str | Path) -> Dataset:
    """All rows of a generation dir as one `datasets.Dataset` (shard order = write order)."""
    from datasets import load_dataset

    import pyarrow.parquet as pq

    read_manifest(out_dir)
    # a shard can be empty (every row of a batch filtered out; it still records the skipped
    # keys for resume); the parquet loader rejects empty files, so leave those out
    files = [str(p) for p in _shards(Path(out_dir)) if pq.ParquetFile(p).metadata.num_rows > 0]
    if not files:
        raise ValueError(f"generation dir {str(out_dir)!r} has no shards yet; run `llmkd generate`")
    return load_dataset("parquet", data_files=files, split="train")
