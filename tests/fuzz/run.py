"""Coverage-guided fuzzing of one target with atheris (libFuzzer), growing its corpus.

    .venv/bin/pip install atheris             # the `fuzz` extra
    .venv/bin/python tests/fuzz/run.py peft_config --seconds 600
    .venv/bin/python tests/fuzz/run.py all --seconds 120
    .venv/bin/python tests/fuzz/run.py all --minimize    # shrink the corpora (libFuzzer -merge=1)

New inputs that reach new code are copied into tests/fuzz/corpus/<target>/ (which the test suite
replays); a crash stops the run and leaves `crash-*` with the input under --artifacts (copy it into
the corpus as crash-NAME once fixed: named inputs, seed-* and crash-*, survive --minimize).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris
    sys.path.insert(0, str(ROOT))
    import google.protobuf  # noqa: F401  - dependencies are not instrumented: only our code is
    import grpc  # noqa: F401
    if target == "generate_request":
        import torch  # noqa: F401
    if target == "gateway_json":
        import starlette.applications  # noqa: F401
    with atheris.instrument_imports(include=["services"]):
        from tests.fuzz.targets import TARGETS
        if target == "generate_request":
            import services.executor.servicer
        if target == "gateway_json":
            import services.gateway.app
        import services.common.auth
        import services.common.peft_format
        import services.registry.core
        import services.registry.sources.file
        import services.registry.sources.hf  # noqa: F401
    fn = TARGETS[target]
    # argv[0] is how libFuzzer re-runs this target (-merge=1 runs it through the shell): the whole command
    atheris.Setup([f"{sys.executable} {__file__} {target} --child --", *libfuzzer_args], fn)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if "--child" in argv:                    # run.py TARGET --child -- LIBFUZZER_ARGS...
        _child(argv[0], argv[argv.index("--") + 1:])
        return 0
    from tests.fuzz.targets import CORPUS, TARGETS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=[*TARGETS, "all"])
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--artifacts", default=str(ROOT / "fuzz-artifacts"))
    p.add_argument("--minimize", action="store_true",
                   help="instead of fuzzing: keep only the inputs that add coverage (and the named ones)")
    args = p.parse_args(argv)
    if args.minimize:
        return minimize(TARGETS if args.target == "all" else [args.target], CORPUS)
    pathlib.Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    status = 0
    for target in (TARGETS if args.target == "all" else [args.target]):
        corpus = CORPUS / target
        corpus.mkdir(parents=True, exist_ok=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
        run = [sys.executable, __file__, target, "--child", "--", str(work), str(corpus),
               f"-max_total_time={args.seconds}", "-timeout=10", "-max_len=65536",
               "-rss_limit_mb=3072", f"-artifact_prefix={args.artifacts}/{target}-", "-print_final_stats=1"]
        print("$", " ".join(run), flush=True)
        rc = subprocess.run(run, cwd=ROOT).returncode
        status = status or rc
        for f in work.iterdir():             # libFuzzer's corpus: inputs that reached new code
            shutil.copyfile(f, corpus / f.name)
        shutil.rmtree(work, ignore_errors=True)
        print(f"{target}: exit {rc}, corpus {len(list(corpus.iterdir()))} inputs", flush=True)
    return status


def minimize(targets, corpus_root: pathlib.Path) -> int:
    status = 0
    for target in targets:
        corpus = corpus_root / target
        out = pathlib.Path(tempfile.mkdtemp(prefix=f"fuzz-min-{target}-"))
        try:
            rc = subprocess.run([sys.executable, __file__, target, "--child", "--", "-merge=1", str(out),
                                 str(corpus)], cwd=ROOT, capture_output=True).returncode
            if rc != 0 or not any(out.iterdir()):    # an empty merge is a failed one: keep the corpus
                print(f"{target}: merge failed (exit {rc}); corpus left as it was", flush=True)
                status = status or rc or 1
                continue
            before = len(list(corpus.iterdir()))
            for f in corpus.iterdir():
                if not f.name.startswith(("seed-", "crash-")):
                    f.unlink()
            for f in out.iterdir():
                shutil.copyfile(f, corpus / f.name)
            print(f"{target}: corpus {before} -> {len(list(corpus.iterdir()))} inputs", flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
