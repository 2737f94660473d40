"""Regenerate the Python code for proto/esper/leyline/*.proto: `python -m esper.leyline.codegen`.

The proto path equals the import path (`package esper.leyline` lives in `proto/esper/leyline/`), so
the generated `esper/leyline/*_pb2.py` need no import rewriting. grpcio-tools and mypy-protobuf are
pinned in pyproject so that a fresh generation is byte-identical to the committed one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
LIBS_ROOT = REPO_ROOT / "libs"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "esper" / "leyline").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy plugin; returns the files written under out_root."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise RuntimeError("protoc-gen-mypy not found next to this Python: pip install -e '.[dev]'")
    out_root.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = sorted(p for p in (out_root / "esper" / "leyline").glob("*_pb2*.py*"))
    # grpc_python_out writes a (near-empty) *_pb2_grpc.py for protos without services: drop those.
    kept = []
    for path in written:
        if path.name.endswith("_pb2_grpc.py") and "class " not in path.read_text():
            path.unlink()
        else:
            kept.append(path)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=LIBS_ROOT, help="root to write esper/leyline/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
