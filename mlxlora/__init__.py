"""LoRA fine-tuning on MLX.

Importing the package loads a fast BLAS on Linux before MLX itself is imported, because
MLX binds its matrix-multiply symbols when ``mlx.core`` is first loaded. Set
``MLXLORA_BLAS=reference`` to keep the BLAS that the mlx wheel links.
"""

from mlxlora import blas

__version__ = "0.1.0"

blas.preload_openblas()
