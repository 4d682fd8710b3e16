import numpy as np
import pytest
import torch

from srmoa_dist.experts.expert import DTYPES, LoRAExpert, bf16_to_f32, f32_to_bf16

SHAPES = {"layers.7.mlp": (16, 16), "layers.8.self_attn.q_proj": (16, 8)}


def test_random_properties():
    e = LoRAExpert.random(SHAPES, rank=4, alpha=8.0, dtype="float16", seed=1)
    assert e.rank == 4
    assert e.scaling == 2.0
    assert e.dtype == "float16"
    assert e.version == 0
    assert e.shapes == SHAPES
    a, b = e.targets["layers.8.self_attn.q_proj"]
    assert a.shape == (4, 16) and b.shape == (8, 4)
    assert e.nbytes == 2 * (4 * 16 + 16 * 4 + 4 * 16 + 8 * 4)
    assert e.same_weights(LoRAExpert.random(SHAPES, 4, 8.0, "float16", seed=1))
    assert not e.same_weights(LoRAExpert.random(SHAPES, 4, 8.0, "float16", seed=2))


def test_random_b_zero_is_lora_init():
    e = LoRAExpert.random(SHAPES, 2, 4.0, "float32", seed=0, b_std=0.0)
    assert all(not b.any() and a.any() for a, b in e.targets.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_astype_round_trip_every_dtype(dtype):
    e32 = LoRAExpert.random(SHAPES, 4, 8.0, "float32", seed=3)
    e = e32.astype(dtype)
    assert e.dtype == dtype
    storage = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype]
    assert all(a.dtype == storage and b.dtype == storage for a, b in e.targets.values())
    back = e.float32()
    tol = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 0}[dtype]
    for n, (a, b) in e32.targets.items():
        np.testing.assert_allclose(back[n][0], a, rtol=tol, atol=tol)
        np.testing.assert_allclose(back[n][1], b, rtol=tol, atol=tol)
    # A second conversion from the converted values is exact.
    assert e.astype("float32").astype(dtype).same_weights(e)


def test_bf16_bits_match_torch():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    x[:4] = [0.0, -0.0, np.inf, -np.inf]
    bits = f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, ref)
    np.testing.assert_array_equal(bf16_to_f32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_to_torch_bf16_and_fold():
    e = LoRAExpert.random(SHAPES, 4, 8.0, "bfloat16", seed=0)
    t = e.to_torch()
    a, b = t["layers.7.mlp"]
    assert a.dtype == torch.bfloat16 and a.shape == (4, 16)
    np.testing.assert_array_equal(a.float().numpy(), e.float32()["layers.7.mlp"][0])
    f = e.to_torch(dtype=torch.float32, fold=True, names=["layers.7.mlp"])
    assert list(f) == ["layers.7.mlp"]
    np.testing.assert_allclose(f["layers.7.mlp"][1].numpy(), e.folded()["layers.7.mlp"][1], rtol=1e-2)
    a.add_(1)  # a copy: the expert is untouched
    assert e.float32()["layers.7.mlp"][0][0, 0] != a[0, 0].item()


def test_folded_applies_scaling_once():
    e = LoRAExpert.random(SHAPES, 4, 6.0, "float32", seed=0)
    for n, (a, b) in e.folded().items():
        np.testing.assert_array_equal(a, e.targets[n][0])
        np.testing.assert_allclose(b, e.targets[n][1] * 1.5, rtol=1e-6)


def test_from_float_accepts_tensors_and_float64():
    a = torch.randn(2, 5, dtype=torch.float64)
    b = np.random.default_rng(0).standard_normal((3, 2))
    e = LoRAExpert.from_float({"x": (a, b)}, alpha=2.0, dtype="float16", version=4)
    assert e.dtype == "float16" and e.version == 4 and e.rank == 2
    np.testing.assert_allclose(e.float32()["x"][0], a.numpy(), rtol=1e-3, atol=1e-3)


def _arr(*shape, dtype=np.float16):
    return np.zeros(shape, dtype=dtype)


F32 = np.float32


@pytest.mark.parametrize(
    "targets, alpha, match",
    [
        ({}, 1.0, "non-empty"),
        ({"x": (_arr(4), _arr(8, 4))}, 1.0, r"targets\['x'\]\.A must be 2-D"),
        ({"x": (_arr(4, 8), _arr(8, 3))}, 1.0, r"targets\['x'\]\.B has shape \(8, 3\).*rank 4"),
        ({"x": (_arr(4, 8), _arr(8, 4)), "y": (_arr(2, 8), _arr(8, 2))}, 1.0, r"targets\['y'\]\.A.*rank 2"),
        ({"x": (_arr(4, 8), _arr(8, 4, dtype=F32))}, 1.0, "A has dtype float16 but B has dtype float32"),
        (
            {"x": (_arr(4, 8), _arr(8, 4)), "y": (_arr(4, 8, dtype=F32), _arr(8, 4, dtype=F32))},
            1.0,
            r"targets\['y'\] has dtype float32",
        ),
        ({"x": (_arr(4, 8, dtype=np.float64), _arr(8, 4, dtype=np.float64))}, 1.0, "dtype float64"),
        ({"x": (_arr(4, 8), _arr(8, 4))}, 0.0, "alpha must be positive"),
        ({"x": (_arr(4, 8), _arr(8, 4))}, float("nan"), "alpha must be positive"),
        ({"x": ([[0.0]], _arr(8, 4))}, 1.0, r"targets\['x'\]\.A must be a numpy array"),
    ],
)
def test_validation_names_field_and_value(targets, alpha, match):
    with pytest.raises(ValueError, match=match):
        LoRAExpert(targets, alpha)


def test_bad_version_and_rank():
    with pytest.raises(ValueError, match="version must be a non-negative integer, got -1"):
        LoRAExpert({"x": (_arr(4, 8), _arr(8, 4))}, 1.0, version=-1)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LoRAExpert.random(SHAPES, 0, 1.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LoRAExpert.random(SHAPES, 2, 1.0, dtype="int8")


def test_equality_compares_weights_and_version():
    e = LoRAExpert.random(SHAPES, 2, 4.0, seed=0)
    same = LoRAExpert.from_float({n: (a.copy(), b.copy()) for n, (a, b) in e.targets.items()}, 4.0)
    assert e == same
    assert e != LoRAExpert(same.targets, 4.0, version=1)
    assert e.same_weights(LoRAExpert(same.targets, 4.0, version=1))
    assert e != LoRAExpert(same.targets, 5.0)
