"""Choose the BLAS that MLX's CPU backend uses on Linux.

The ``mlx[cpu]`` wheel links the netlib reference BLAS, which runs float32 matrix
multiplication at about 5 GFLOP/s. Loading OpenBLAS with RTLD_GLOBAL before ``mlx.core``
is imported makes MLX resolve ``cblas_sgemm`` to OpenBLAS instead (about 190 GFLOP/s on a
2-core x86_64 machine, measured with mlx 0.32.4). macOS uses Accelerate and Metal, so
nothing is loaded there. This module must not import mlx.
"""

import ctypes
import os
import platform
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"

# One of "openblas <path>", "reference (...)", "accelerate" or "not linux"; read by the log.
status = "not loaded"


def preload_openblas() -> str:
    """Load OpenBLAS globally on Linux if it is installed, and return a status line."""
    global status

    if platform.system() != "Linux":
        status = "Accelerate (macOS)" if platform.system() == "Darwin" else "wheel default"
        return status

    if os.environ.get("MLXLORA_BLAS", "").lower() == "reference":
        status = "reference BLAS (MLXLORA_BLAS=reference)"
        return status

    if "mlx.core" in sys.modules:
        status = "reference BLAS (mlx.core was imported before mlxlora)"
        return status

    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as error:
                status = f"reference BLAS (loading {path} failed: {error})"
                return status
            status = f"OpenBLAS {path}"
            return status

    status = f"reference BLAS, about 30x slower on CPU; install OpenBLAS with: {INSTALL_HINT}"
    return status


def is_fast() -> bool:
    """Return whether matrix multiplication runs on an optimised BLAS or a GPU."""
    return not status.startswith("reference")
