"""Packaging beyond pyproject.toml: the wheel ships the kernel sources (cpp/, built at run time by
services.executor.ops) inside the package as services/_cpp; services/cpp_sources.py finds them."""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_SUFFIXES = {".cpp", ".h", ".cu", ".cuh"}


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        root = pathlib.Path(__file__).resolve().parent / "cpp"
        target = pathlib.Path(self.build_lib) / "services" / "_cpp"
        for path in sorted(root.rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                out = target / path.relative_to(root)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
