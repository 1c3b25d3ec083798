"""Build script for procrustes_kernels.

The package is pure Python plus optional compiled backends; importing it never needs a GPU or a
compiler. The C++/OpenMP backend (``procrustes_kernels._C``, sources in ``csrc/``) is built here
when a C++17 compiler is available; if it cannot be built the install still succeeds, says so, and
CPU tensors use the PyTorch reference. ``PROCRUSTES_BUILD_CPP=0`` skips it on purpose.
"""

import os
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    from pybind11.setup_helpers import build_ext as _pybind11_build_ext
except ImportError:  # only when building outside pip's isolated env without pybind11
    Pybind11Extension = None
    _pybind11_build_ext = None

CPP_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/ops_f32.cpp",
    "csrc/ops_f64.cpp",
    "csrc/philox_simd.cpp",
    "csrc/runtime.cpp",
    "csrc/spmm.cpp",
]
CPP_HEADERS = [
    "csrc/common.h",
    "csrc/kernels.h",
    "csrc/masks.h",
    "csrc/ops.h",
    "csrc/parallel.h",
    "csrc/passes.h",
    "csrc/philox.h",
    "csrc/score.h",
    "csrc/sinks.h",
    "csrc/spmm.h",
]
# -ffp-contract=off: the kernels must round like PyTorch's separate ops (no silent FMA fusion);
# the FMAs that PyTorch itself performs are written out explicitly in the sources. -g0 drops the
# debug info Python's default flags ask for, which doubles the compile time.
GCC_COMPILE_ARGS = ["-O3", "-g0", "-ffp-contract=off"]
OPENMP_ARGS = ["-fopenmp"]
MSVC_COMPILE_ARGS = ["/O2", "/fp:precise", "/openmp"]


def _note(msg: str) -> None:
    print(f"\n*** procrustes_kernels: {msg}\n", file=sys.stderr, flush=True)


_FALLBACK = (
    "installing without the C++ backend; CPU tensors will use the (slower) PyTorch "
    "reference. Install a C++17 compiler and reinstall to build it."
)

cmdclass = {}
ext_modules = []
if os.environ.get("PROCRUSTES_BUILD_CPP", "1") == "0":
    _note(
        "PROCRUSTES_BUILD_CPP=0: skipping the C++ backend; CPU tensors will use the PyTorch reference."
    )
elif Pybind11Extension is None:
    _note("pybind11 is not installed: " + _FALLBACK)
else:
    # Compile the sources of the extension in parallel (NPY_NUM_BUILD_JOBS overrides the count).
    ParallelCompile("NPY_NUM_BUILD_JOBS").install()

    class OptionalBuildExt(_pybind11_build_ext):
        """build_ext that never fails the install: without OpenMP if need be, else without C++."""

        def run(self) -> None:
            self._failed = False
            try:
                super().run()
            except Exception as err:
                # No usable compiler at all, or a follow-up of a failure already reported (an
                # editable install then finds no library to copy into the source tree).
                if not self._failed:
                    _note(
                        f"cannot build the C++ backend ({type(err).__name__}: {err}); {_FALLBACK}"
                    )

        def build_extension(self, ext) -> None:
            msvc = self.compiler.compiler_type == "msvc"
            base = MSVC_COMPILE_ARGS[:-1] if msvc else GCC_COMPILE_ARGS
            omp_compile = MSVC_COMPILE_ARGS[-1:] if msvc else OPENMP_ARGS
            omp_link = [] if msvc else OPENMP_ARGS
            attempts = [(base + omp_compile, omp_link, "with OpenMP"), (base, [], "without OpenMP")]
            for i, (cflags, lflags, how) in enumerate(attempts):
                ext.extra_compile_args = cflags
                ext.extra_link_args = lflags
                try:
                    super().build_extension(ext)
                    if i:
                        _note(f"built the C++ backend {how}: its kernels run single-threaded.")
                    return
                except Exception as err:
                    error = f"{type(err).__name__}: {err}"
                    if i + 1 < len(attempts):
                        _note(f"building the C++ backend {how} failed ({error}); retrying.")
            self._failed = True
            _note(f"building the C++ backend failed ({error}); {_FALLBACK}")

    cmdclass["build_ext"] = OptionalBuildExt
    ext_modules.append(
        Pybind11Extension(
            "procrustes_kernels._C",
            CPP_SOURCES,
            depends=CPP_HEADERS,
            include_dirs=["csrc"],
            cxx_std=17,
        )
    )

setup(
    name="procrustes_kernels",
    version="0.1.0",
    description="Train PyTorch networks on a pruned weight budget (DropBack / Procrustes).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["procrustes_kernels", "procrustes_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],  # add_safe_globals, autocast per device type
    extras_require={
        "triton": ["triton>=3.6"],
        "demo": ["tqdm", "matplotlib", "scikit-learn"],
        "test": ["pytest", "hypothesis", "triton>=3.6", "tqdm", "matplotlib", "scikit-learn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
