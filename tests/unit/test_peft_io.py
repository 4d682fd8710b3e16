import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from srmoa_dist.experts.expert import DTYPES, LoRAExpert
from srmoa_dist.experts.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

P = "base_model.model.model."
SHAPES = {
    "layers.0.self_attn.q_proj": (32, 32),
    "layers.0.self_attn.v_proj": (32, 16),
    "layers.1.self_attn.q_proj": (32, 32),
    "layers.1.self_attn.v_proj": (32, 16),
}


def _write_adapter(path, tensors, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **cfg}))


def test_load_hand_written_adapter(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in (1, 0, 10, 2):  # file order is not layer order
        tensors[f"{P}layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 24, generator=g)
        tensors[f"{P}layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(12, 4, generator=g)
    _write_adapter(tmp_path / "a", tensors, target_modules=["q_proj"])
    e = load_peft_adapter(tmp_path / "a")
    assert list(e.targets) == [f"layers.{i}.self_attn.q_proj" for i in (0, 1, 2, 10)]
    assert e.rank == 4 and e.alpha == 8.0 and e.scaling == 2.0 and e.dtype == "float32" and e.version == 0
    a, b = e.targets["layers.10.self_attn.q_proj"]
    np.testing.assert_array_equal(a, tensors[P + "layers.10.self_attn.q_proj.lora_A.weight"].numpy())
    np.testing.assert_array_equal(b, tensors[P + "layers.10.self_attn.q_proj.lora_B.weight"].numpy())
    assert load_peft_adapter(tmp_path / "a", dtype="float16").dtype == "float16"


def test_rslora_alpha_is_converted(tmp_path):
    t = {P + "layers.0.mlp.down_proj.lora_A.weight": torch.ones(4, 8),
         P + "layers.0.mlp.down_proj.lora_B.weight": torch.ones(8, 4)}
    _write_adapter(tmp_path / "a", t, use_rslora=True)
    e = load_peft_adapter(tmp_path / "a")
    assert e.scaling == pytest.approx(8 / 2)  # lora_alpha / sqrt(r)


XAB = {"x.lora_A.weight": torch.ones(4, 8), "x.lora_B.weight": torch.ones(8, 4)}


@pytest.mark.parametrize(
    "tensors, cfg, match",
    [
        ({P + "layers.0.q_proj.lora_A.weight": torch.ones(4, 8)}, {}, "not its pair"),
        ({P + "layers.0.q_proj.lora_A.weight": torch.ones(3, 8),
          P + "layers.0.q_proj.lora_B.weight": torch.ones(8, 3)}, {}, "r = 4"),
        ({P + "layers.0.q_proj.lora_magnitude_vector": torch.ones(8)}, {}, "not a LoRA"),
        (XAB, {"use_dora": True}, "use_dora"),
        (XAB, {"rank_pattern": {"x": 8}}, "rank_pattern"),
        (XAB, {"peft_type": "IA3"}, "IA3"),
    ],
)
def test_unsupported_adapters_refused(tmp_path, tensors, cfg, match):
    _write_adapter(tmp_path / "a", tensors, **cfg)
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(tmp_path / "a")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_peft_adapter(tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip_every_dtype(tmp_path, dtype):
    e = LoRAExpert.random(SHAPES, rank=4, alpha=16.0, dtype=dtype, seed=3)
    save_peft_adapter(e, tmp_path / "out", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16.0 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0, 1]
    back = load_peft_adapter(tmp_path / "out")
    assert back.dtype == dtype and back.same_weights(e)


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )

    def make():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    return make


def test_real_peft_adapter_both_ways(tmp_path, tiny_llama):
    peft = pytest.importorskip("peft")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_llama(), lcfg).eval()
    model.save_pretrained(tmp_path / "peft")

    e = load_peft_adapter(tmp_path / "peft")
    assert set(e.targets) == set(SHAPES) and e.rank == 4 and e.scaling == 2.0
    assert e.shapes == SHAPES  # v_proj: 2 kv heads * head_dim 8 = 16 outputs
    q0 = model.base_model.model.model.layers[0].self_attn.q_proj
    a0, b0 = e.targets["layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(a0, q0.lora_A["default"].weight.detach().numpy())
    np.testing.assert_array_equal(b0, q0.lora_B["default"].weight.detach().numpy())

    # Our export loads back into PEFT and computes the same function.
    save_peft_adapter(e, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        base = tiny_llama()(input_ids=x).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(base, want)  # the adapter does something

    # And the math is delta(x) = scaling * B @ A @ x.
    a, b = e.folded()["layers.0.self_attn.q_proj"]
    h = torch.randn(3, 32)
    with torch.no_grad():
        delta = q0(h) - q0.base_layer(h)
    np.testing.assert_allclose(delta.numpy(), h.numpy() @ a.T @ b.T, rtol=1e-4, atol=1e-5)
