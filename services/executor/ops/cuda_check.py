"""Compile-check the CUDA sources (cpp/cuda) with nvcc, without a GPU or a CUDA build of torch.

    .venv/bin/python -m services.executor.ops.cuda_check [--arch 90] [--verbose]

Prints the objects' paths; exits 1 with nvcc's output if a source fails to compile. The check builds
objects only: running the kernels needs a GPU, where tests/test_kernel.py's CUDA tests run them.
"""

from __future__ import annotations

import argparse
import sys

from .build import KernelBuildError, compile_cuda_check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="compute capability without the dot (default 90)")
    ap.add_argument("--verbose", action="store_true", help="print the nvcc command lines")
    args = ap.parse_args()
    try:
        for path in compile_cuda_check(arch=args.arch, verbose=args.verbose):
            print(path)
    except KernelBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
