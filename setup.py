"""Packaging glue that pyproject.toml alone cannot express.

The top-level folders install as the ``fastdecode.*`` namespace: ``actors/`` is
``fastdecode.actors`` and so on, for normal and editable installs alike.

The native attention library (``native/csrc``) is compiled by the install (``build_ext``) into
``fastdecode/native/_fdnative.so``: a portable baseline unit plus AVX2+FMA+F16C, AVX-512 and AMX units,
each only where the compiler accepts the flags; the library picks one at run time. Editable installs
get the library copied next to ``native/lib.py``.
"""
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

TOP_LEVEL = ("actors", "transport", "native", "scheduler", "cli")

NATIVE_EXT = "fastdecode.native._fdnative"
NATIVE_SRC = os.path.join("native", "csrc")
NATIVE_COMMON = ["api.cpp", "pool.cpp", "attend.cpp", "team.cpp", "kernel_generic.cpp"]
NATIVE_BASE_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
                     "-fvisibility-inlines-hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
# (unit, macro the dispatcher sees, flags, probe code): compiled only when the compiler accepts the flags and the
# probe (the AMX unit also needs an assembler that knows the tile instructions).
NATIVE_ISA_UNITS = [
    ("kernel_avx2.cpp", "FD_HAVE_AVX2", ["-mavx2", "-mfma", "-mf16c"], ""),
    ("kernel_avx512.cpp", "FD_HAVE_AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"], ""),
    ("kernel_amx.cpp", "FD_HAVE_AMX", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
                                       "-mamx-bf16", "-mavx2", "-mfma", "-mf16c"],
     "void probe() { _tile_release(); }\n"),
]


def _packages():
    packages, package_dir = [], {}
    for top in TOP_LEVEL:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d != "csrc")
            if "__init__.py" in files:
                name = "fastdecode." + root.replace(os.sep, ".")
                packages.append(name)
                package_dir[name] = root
    return packages, package_dir


class build_native_ext(build_ext):
    """Builds the ctypes library with the C++ compiler directly (per-unit ISA flags)."""

    def get_ext_filename(self, fullname):
        if fullname in (NATIVE_EXT, NATIVE_EXT.rsplit(".", 1)[1]):   # a ctypes library: no ABI tag
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != NATIVE_EXT:
            return super().build_extension(ext)
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise CompileError(
                f"fastdecode: the C++ compiler {cxx!r} was not found. The native attention library "
                "(native/csrc) needs a C++17 compiler with OpenMP: install g++ (e.g. `apt-get install g++`) "
                "or set CXX, then reinstall.")
        out_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        obj_dir = os.path.join(self.build_temp, "fdnative")
        os.makedirs(obj_dir, exist_ok=True)
        units = [(name, []) for name in NATIVE_COMMON]
        macros = []
        if platform.machine().lower() in ("x86_64", "amd64"):
            for name, macro, flags, probe in NATIVE_ISA_UNITS:
                if self._accepts(cxx, flags, probe):
                    units.append((name, flags))
                    macros.append(f"-D{macro}=1")
                else:
                    print(f"fastdecode: {cxx} does not accept {' '.join(flags)}; building without {name}")
        jobs = [(os.path.join(NATIVE_SRC, name), os.path.join(obj_dir, name[:-4] + ".o"), flags + macros)
                for name, flags in units]
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            list(pool.map(lambda job: self._run([cxx, *NATIVE_BASE_FLAGS, *job[2], "-c", job[0], "-o", job[1]]), jobs))
        self._run([cxx, "-shared", "-fopenmp", "-Wl,-z,defs", "-o", out_path, *[job[1] for job in jobs]])

    @staticmethod
    def _accepts(cxx, flags, body=""):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("#include <immintrin.h>\n" + body + "int main() { return 0; }\n")
            cmd = [cxx, "-std=c++17", *flags, "-c", src, "-o", os.path.join(tmp, "probe.o")]
            return subprocess.run(cmd, capture_output=True).returncode == 0

    @staticmethod
    def _run(cmd):
        print(" ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CompileError(f"fastdecode native build failed: {' '.join(cmd)}\n{result.stdout}{result.stderr}")


native_sources = (sorted(os.path.join(NATIVE_SRC, f) for f in os.listdir(NATIVE_SRC))
                  if os.path.isdir(NATIVE_SRC) else [])
packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=[Extension(NATIVE_EXT, sources=[s for s in native_sources if s.endswith(".cpp")],
                           depends=native_sources)],
    cmdclass={"build_ext": build_native_ext},
    # The only non-Python files in the package folders are native/csrc's sources: compiled into _fdnative.so,
    # shipped in the sdist (MANIFEST.in) but not in the wheel. Off, setuptools neither copies them into
    # fastdecode/native/csrc nor warns that this folder is absent from `packages`.
    include_package_data=False,
)
