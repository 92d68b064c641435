"""Generate the Python protobuf/gRPC stubs from protos/.

    python -m services.common.protogen            # rewrite services/common/gen/
    python -m services.common.protogen --check    # exit 1 if the checked-in stubs are stale

protoc writes `from openlora.v1 import x_pb2`; we rewrite that to the stubs' real package
(`services.common.gen.openlora.v1`) so no sys.path tricks are needed.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GEN = ROOT / "services" / "common" / "gen"
_IMPORT = re.compile(r"^from openlora\.v1 import", re.MULTILINE)


def generate(out: pathlib.Path) -> dict[str, str]:
    """Run protoc over protos/ into `out`; returns {relative path: text} of every generated file."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on protos/")
    result = {}
    for path in sorted(out.rglob("*.py*")):
        text = _IMPORT.sub("from services.common.gen.openlora.v1 import", path.read_text())
        result[str(path.relative_to(out))] = text
    for pkg in ("", "openlora", "openlora/v1"):
        result[f"{pkg}/__init__.py".lstrip("/")] = ""
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        want = generate(pathlib.Path(tmp))
    # .py and .pyi only: a __pycache__ of compiled stubs is not part of what is generated
    have = ({str(p.relative_to(GEN)): p.read_text() for p in GEN.rglob("*") if p.suffix in (".py", ".pyi")}
            if GEN.exists() else {})
    if args.check:
        stale = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if stale:
            print("stale generated stubs: " + ", ".join(stale) +
                  "\nrun: python -m services.common.protogen", file=sys.stderr)
            return 1
        return 0
    for name in have.keys() - want.keys():
        (GEN / name).unlink()
    for name, text in want.items():
        (GEN / name).parent.mkdir(parents=True, exist_ok=True)
        (GEN / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
