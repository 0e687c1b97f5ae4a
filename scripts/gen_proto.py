"""Generate the Python gRPC stubs of proto/chitu/v1 into services/proto/chitu/v1.

The stubs are generated, never edited by hand; tests/unit/test_proto_stubs.py fails when they are stale.
protoc emits absolute imports (``from chitu.v1 import tensor_pb2``); they are rewritten to the package path
(``from services.proto.chitu.v1 import tensor_pb2``) so the stubs live inside the ``services`` package.

Run with grpcio-tools 1.84.0: stubs refuse to import under a grpcio older than the grpcio-tools that made
them, and the GPU image ships grpcio 1.84.0.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "services" / "proto"
PACKAGE_PREFIX = "services.proto"
REQUIRED_TOOLS_VERSION = "1.84.0"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "chitu" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into out_root and return the generated files (relative paths)."""
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != REQUIRED_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools=={REQUIRED_TOOLS_VERSION} is required (found {version}); "
                         f"pip install grpcio-tools=={REQUIRED_TOOLS_VERSION}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = src.read_text()
            text = re.sub(r"^from chitu\.v1 import", f"from {PACKAGE_PREFIX}.chitu.v1 import", text, flags=re.M)
            text = re.sub(r"^import chitu\.v1\.", f"import {PACKAGE_PREFIX}.chitu.v1.", text, flags=re.M)
            dst = out_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
            written.append(rel)
    for pkg in (out_root, out_root / "chitu", out_root / "chitu" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (scripts/gen_proto.py); do not edit."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_ROOT, help="output root (default: services/proto)")
    args = parser.parse_args(argv)
    target = args.out
    if target == OUT_ROOT and (OUT_ROOT / "chitu").exists():
        shutil.rmtree(OUT_ROOT / "chitu")
    files = generate(target)
    print(f"generated {len(files)} files under {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
