"""Fingerprints of a checkpoint's stage components, to find checkpoints that can share an encoder or a VAE.

Two checkpoints can share a stage service when that stage's components are identical: the same family (the same
prompt encoding / decode code), the same configs and the same weights and tokenizer files. Wan2.1-T2V 1.3B, 14B
and Wan2.2-T2V-A14B, for example, ship the same UMT5 encoder and Wan VAE.

A fingerprint hashes, per component folder, every config file as canonical JSON without the keys that only
record who saved it (``_name_or_path``, library versions), and every other file by content. Content hashes of
large files are cached by (path, size, mtime) in a JSON file, so a 10 GB text encoder is read once, not at every
``chitu up``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from services.families.base import FamilyAdapter

VOLATILE_KEYS = frozenset({"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"})
"""Config keys that say how a file was saved, not what it holds."""
_BLOCK = 16 * 1024 * 1024


def _canonical_json(path: Path) -> bytes:
    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True, separators=(",", ":")).encode()


class FileHashCache:
    """Content hashes keyed by (resolved path, size, mtime_ns), kept in a JSON file (``None``: in memory only)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._entries: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        self._dirty = False

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._entries:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(_BLOCK):
                    h.update(block)
            self._entries[key] = h.hexdigest()
            self._dirty = True
        return self._entries[key]

    def save(self) -> None:
        """Write the cache atomically (a concurrent writer's entries may be lost, never corrupted)."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self._entries, f)
        os.replace(tmp, self.path)
        self._dirty = False


def component_digest(folder: Path, cache: FileHashCache) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(rel.encode() + b"\0")
        h.update(_canonical_json(path) if path.suffix == ".json" else cache.digest(path).encode())
        h.update(b"\0")
    return h.hexdigest()


def stage_fingerprint(adapter: FamilyAdapter, stage: str, cache: FileHashCache | None = None) -> str:
    """Identical for two checkpoints exactly when one stage service can serve ``stage`` for both."""
    cache = cache or FileHashCache()
    h = hashlib.sha256(f"{adapter.family}|{type(adapter).__name__}|{stage}".encode())
    for component in adapter.stage_components(stage):
        entry = adapter.model_index.get(component)
        h.update(f"|{component}={json.dumps(entry)}|".encode())
        folder = adapter.checkpoint / component
        if folder.is_dir():
            h.update(component_digest(folder, cache).encode())
    return h.hexdigest()
