"""fastdecode.native: the C++ OpenMP attention library (native/csrc) and its ctypes binding (lib.py)."""

# The kernel paths in the C ABI's order (fdnative.h: fd_isa), kept here so that the CLI can offer them
# without loading the library.
ISA_NAMES = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
