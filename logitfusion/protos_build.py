"""Generate the Python protobuf/gRPC code of protos/logitfusion/v1/*.proto into logitfusion/v1/.

The generated modules are committed (so a plain install needs no protoc) and are never edited by hand:

    python -m logitfusion.protos_build           # regenerate logitfusion/v1/*_pb2*.py[i]
    python -m logitfusion.protos_build --check   # regenerate into a temp dir, diff, exit 1 on any difference

Every .proto in protos/logitfusion/v1/ is compiled in one protoc run with ``-Iprotos``, so a proto file
``protos/logitfusion/v1/x.proto`` becomes the module ``logitfusion.v1.x_pb2`` (and ``x_pb2_grpc``, ``x_pb2.pyi``).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("logitfusion") / "v1"  # relative to both PROTO_ROOT and the output root
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class ProtoBuildError(RuntimeError):
    """protoc failed or the proto sources are missing."""


@dataclass(frozen=True)
class CheckResult:
    """The difference between freshly generated code and the committed files."""

    differing: tuple[str, ...]  # generated files whose committed copy differs (paths relative to the repo root)
    missing: tuple[str, ...]  # generated files that are not committed
    stale: tuple[str, ...]  # committed generated files that no .proto produces any more

    @property
    def ok(self) -> bool:
        return not (self.differing or self.missing or self.stale)


def proto_sources(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto of the package, relative to proto_root, sorted (so protoc's output order is stable)."""
    folder = proto_root / PACKAGE_DIR
    sources = sorted(p.relative_to(proto_root) for p in folder.glob("*.proto"))
    if not sources:
        raise ProtoBuildError(f"no .proto files in {folder}")
    return sources


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every proto into out_root/logitfusion/v1/; return the generated files (relative to out_root)."""
    from grpc_tools import protoc  # heavy import: only when generating

    sources = proto_sources(proto_root)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(s) for s in sources),
    ]
    code = protoc.main(args)
    if code != 0:
        raise ProtoBuildError(f"protoc exited with {code} for {', '.join(map(str, sources))}")
    return generated_files(out_root)


def generated_files(root: Path) -> list[Path]:
    """The generated files present under root/logitfusion/v1/, relative to root, sorted."""
    folder = root / PACKAGE_DIR
    return sorted(p.relative_to(root) for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def check(repo_root: Path = REPO_ROOT, proto_root: Path = PROTO_ROOT) -> CheckResult:
    """Regenerate into a temporary directory and compare byte for byte with the committed files."""
    with tempfile.TemporaryDirectory(prefix="logitfusion-protos-") as tmp:
        fresh_root = Path(tmp)
        fresh = set(generate(fresh_root, proto_root))
        committed = set(generated_files(repo_root))
        differing = [
            p for p in sorted(fresh & committed) if not filecmp.cmp(fresh_root / p, repo_root / p, shallow=False)
        ]
    return CheckResult(
        differing=tuple(map(str, differing)),
        missing=tuple(map(str, sorted(fresh - committed))),
        stale=tuple(map(str, sorted(committed - fresh))),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitfusion.protos_build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="diff freshly generated code against the committed files")
    args = parser.parse_args(argv)
    if args.check:
        result = check()
        for label, paths in (("differs", result.differing), ("missing", result.missing), ("stale", result.stale)):
            for path in paths:
                print(f"{label}: {path}")
        if not result.ok:
            print("generated code is out of date: run `python -m logitfusion.protos_build`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for path in generated_files(REPO_ROOT):  # drop stale outputs of removed protos
        (REPO_ROOT / path).unlink()
    for path in generate(REPO_ROOT):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
