"""The generated stubs are fresh (regenerating changes nothing) and the contracts follow the house style."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_proto  # noqa: E402


def test_stubs_are_not_stale(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    files = gen_proto.generate(tmp_path)
    assert files
    for rel in files:
        committed = ROOT / "services" / "proto" / rel
        assert committed.is_file(), f"{rel} is not committed; run scripts/gen_proto.py"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale; run scripts/gen_proto.py"
    generated = {p.relative_to(ROOT / "services" / "proto") for p in (ROOT / "services" / "proto").rglob("*_pb2*.py*")}
    assert generated == set(files), "stubs without a .proto source are committed"


def test_stubs_support_grpcio_1_84_0() -> None:
    paths = sorted((ROOT / "services" / "proto" / "chitu" / "v1").glob("*_pb2_grpc.py"))
    assert paths, "no generated stubs found"
    for path in paths:
        assert "GRPC_GENERATED_VERSION = '1.84.0'" in path.read_text(), path


def test_every_element_has_a_comment_and_enums_have_unspecified_zero() -> None:
    protos = sorted((ROOT / "proto" / "chitu" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    for proto in protos:
        lines = proto.read_text().splitlines()
        assert "package chitu.v1;" in lines
        for i, line in enumerate(lines):
            s = line.strip()
            element = re.match(r"^(message|enum|service|rpc|oneof)\s+\w+", s) or re.match(
                r"^(optional |repeated )?[\w.<>, ]+\s+\w+\s*=\s*\d+;", s)
            if element:
                prev = lines[i - 1].strip()
                assert prev.startswith("//"), f"{proto.name}:{i + 1}: {s!r} has no comment"
            m = re.match(r"^enum\s+(\w+)", s)
            if m:
                snake = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", m.group(1)).upper()
                first = next(x.strip() for x in lines[i + 1:] if x.strip() and not x.strip().startswith("//"))
                assert first == f"{snake}_UNSPECIFIED = 0;", f"{proto.name}: enum {m.group(1)} starts with {first!r}"
