"""Builds lstmopt's native library when lstmopt is installed (``pip install``, ``pip wheel``), for every
instruction-set variant: what runs lstmopt then needs no compiler. What is built, and how, is in
lstmopt/kernels/compile.py; the rest of the project's metadata is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location("lstmopt_compile", Path(__file__).parent / "lstmopt/kernels/compile.py")
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)


def _libraries(packs_file: str) -> list[str]:
    return [str(Path(packs_file).parent / "lib" / name) for name in native.library_files()]


class BuildNative(build_ext):
    """The extension module ``lstmopt.kernels._packs``, and beside it ``lib/`` with the ops libraries
    (which setuptools does not know of: they are listed and copied with the module)."""

    def build_extension(self, ext):
        packs = Path(self.get_ext_fullpath(ext.name))
        native.build_installed(packs.parent / "lib", packs)

    def get_outputs(self):
        return [path for packs in super().get_outputs() for path in (packs, *_libraries(packs))]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        return {**mapping, **{built: placed for packs_built, packs_placed in mapping.items()
                              if packs_built.endswith(".so")
                              for built, placed in zip(_libraries(packs_built), _libraries(packs_placed))}}

    def copy_extensions_to_source(self):  # an editable install: the module and lib/ go to the source tree
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            placed, built = self._get_inplace_equivalent(build_py, ext)
            for source, target in zip(_libraries(built), _libraries(placed)):
                Path(target).parent.mkdir(exist_ok=True)
                self.copy_file(source, target, level=self.verbose)


# Before anything is built or resolved: pip would replace an unsupported torch to satisfy pyproject's range.
native.check_supported_torch(native.torch_build_info()["version"])

# Optional only where the kernel cannot exist (not x86-64): there lstmopt installs without it and says so when
# it would load it. On x86-64 a failed build fails the install, rather than ship lstmopt without its kernel.
setup(ext_modules=[Extension("lstmopt.kernels._packs", sources=[], optional=not native.X86_64)],
      cmdclass={"build_ext": BuildNative})
