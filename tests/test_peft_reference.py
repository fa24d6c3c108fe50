"""Cross-check against real PEFT: the same tiny llama in transformers and in MLX, with identical
weights and the same adapter, must give the same logits in float32.

Needs the peft extra (torch, peft): pip install -e ".[peft]".
"""

import numpy as np
import pytest

import mlxlora  # noqa: F401  (loads OpenBLAS before mlx.core)

MISSING_EXTRA = "the peft extra is not installed: pip install -e '.[peft]'"
torch = pytest.importorskip("torch", reason=MISSING_EXTRA)
peft = pytest.importorskip("peft", reason=MISSING_EXTRA)
transformers = pytest.importorskip("transformers", reason=MISSING_EXTRA)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxlora.adapters import (AdapterSpec, base_fingerprint, base_signature,  # noqa: E402
                              load_adapter, save_adapter)
from mlxlora.attach import attach_lora, lora_layers, natural_key, resolve_targets  # noqa: E402
from mlxlora.loading import load_model  # noqa: E402
from mlxlora.peft_io import export_peft  # noqa: E402
from mlxlora.testing.tiny import make_model  # noqa: E402

# transformers 5 warns about its own deprecated call while PEFT wraps the model.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

LAYERS = 3
TOKENS = [[5, 17, 200, 3, 99, 42, 7, 128]]
TOLERANCE = 1e-4


def hf_twin(seed: int = 0):
    """Return transformers' LlamaForCausalLM with the weights of make_model(seed=seed)."""
    mlx_model = make_model(layers=LAYERS, seed=seed)
    args = mlx_model.args
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    model = transformers.LlamaForCausalLM(config)
    state = {name: torch.from_numpy(np.array(value))
             for name, value in tree_flatten(mlx_model.parameters())}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def mlx_logits(model) -> np.ndarray:
    model.eval()
    return np.array(model(mx.array(TOKENS)))


def peft_lora_paths(peft_model) -> list[str]:
    """Return the module paths PEFT gave a LoRA layer, without PEFT's wrapper prefix."""
    prefix = "base_model.model."
    paths = [name[len(prefix):] for name, module in peft_model.named_modules()
             if isinstance(module, peft.tuners.lora.LoraLayer)]
    return sorted(paths, key=natural_key)


def test_base_models_agree():
    difference = np.abs(torch_logits(hf_twin()) - mlx_logits(make_model(layers=LAYERS)))
    assert difference.max() < TOLERANCE


EXPORT_CASES = {
    "attention-all-blocks": dict(targets=["attention"], layers=None, use_rslora=False,
                                 dropout=0.0),
    "last-block-rslora": dict(targets=["q_proj", "down_proj"], layers=1, use_rslora=True,
                              dropout=0.1),
    "mixed-set-regex": dict(targets=["model.layers.0.self_attn.q_proj",
                                     "model.layers.2.mlp.up_proj", "lm_head"],
                            layers=None, use_rslora=False, dropout=0.05),
}


@pytest.mark.parametrize("case", EXPORT_CASES.values(), ids=EXPORT_CASES.keys())
def test_export_matches_peft(tmp_path, case):
    model = make_model(layers=LAYERS)
    spec_base = base_fingerprint(model), base_signature(model)
    paths = resolve_targets(model, case["targets"], case["layers"])
    attach_lora(model, paths, r=4, lora_alpha=8.0, lora_dropout=case["dropout"],
                use_rslora=case["use_rslora"])
    mx.random.seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape)
    spec = AdapterSpec("tiny-llama", *spec_base, r=4, lora_alpha=8.0,
                       lora_dropout=case["dropout"], use_rslora=case["use_rslora"],
                       target_modules=paths, layers=case["layers"])
    save_adapter(tmp_path / "mlx", model, spec)

    export_peft(tmp_path / "mlx", tmp_path / "peft")
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "peft"))
    peft_model = peft.PeftModel.from_pretrained(hf_twin(), str(tmp_path / "peft")).eval()

    assert config.r == 4
    assert config.use_rslora is case["use_rslora"]
    assert peft_lora_paths(peft_model) == paths
    difference = np.abs(torch_logits(peft_model) - mlx_logits(model))
    assert difference.max() < TOLERANCE


IMPORT_CASES = {
    "leaf-names": dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "all-linear-rslora": dict(target_modules="all-linear", use_rslora=True, lora_alpha=5),
    "regex": dict(target_modules=r"model\.layers\.[12]\.mlp\.(gate|up)_proj"),
    "layers-to-transform": dict(target_modules=["o_proj", "down_proj"], layers_to_transform=[2],
                                layers_pattern="layers"),
    "exclude-modules": dict(target_modules=["k_proj", "v_proj"], exclude_modules=["v_proj"]),
}


@pytest.mark.parametrize("case", IMPORT_CASES.values(), ids=IMPORT_CASES.keys())
def test_peft_adapter_matches_mlxlora(tmp_path, case):
    options = dict(r=4, lora_alpha=16, task_type="CAUSAL_LM", init_lora_weights=False) | case
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf_twin(), peft.LoraConfig(**options)).eval()
    peft_model.save_pretrained(str(tmp_path))

    model = make_model(layers=LAYERS)
    spec = load_adapter(model, tmp_path)

    assert spec.format == "peft"
    assert spec.target_modules == peft_lora_paths(peft_model)
    assert spec.use_rslora is case.get("use_rslora", False)
    difference = np.abs(torch_logits(peft_model) - mlx_logits(model))
    assert difference.max() < TOLERANCE


def test_export_on_stories260k(tmp_path, shared_data):
    gguf = shared_data / "models" / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found")
    loaded = load_model(str(gguf))
    model = loaded.model
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**loaded.config))
    hf_model.load_state_dict({name: torch.from_numpy(np.array(value))
                              for name, value in tree_flatten(model.parameters())}, strict=True)
    spec_base = base_fingerprint(model), base_signature(model)

    paths = resolve_targets(model, ["all-linear"], layers=3)
    attach_lora(model, paths, r=8, lora_alpha=16.0, use_rslora=True)
    mx.random.seed(2)
    for layer in lora_layers(model).values():
        layer.lora_B = 0.05 * mx.random.normal(layer.lora_B.shape)
    spec = AdapterSpec(str(gguf), *spec_base, r=8, lora_alpha=16.0, lora_dropout=0.0,
                       use_rslora=True, target_modules=paths, layers=3)
    save_adapter(tmp_path / "mlx", model, spec)
    export_peft(tmp_path / "mlx", tmp_path / "peft", base_model="stories260K")

    peft_model = peft.PeftModel.from_pretrained(hf_model.eval(), str(tmp_path / "peft")).eval()
    assert peft_lora_paths(peft_model) == paths
    difference = np.abs(torch_logits(peft_model) - mlx_logits(model))
    assert difference.max() < TOLERANCE
