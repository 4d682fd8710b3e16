"""ExpertFusion on a tiny random Llama: exact base output without experts, batched einsum = reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from srmoa_dist.config import ExpertConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.model.fusion import ExpertFusion, decoder_layers


@pytest.fixture
def batch(tiny_base):
    tok = tiny_base.tokenizer
    enc = tok(
        ["What is the capital of France?", "Why is the sky blue", "Tell me a joke"],
        return_tensors="pt",
        padding=True,
    )
    return enc["input_ids"], enc["attention_mask"]


def _experts(fusion, n, rank=4, dtype="float32"):
    return [
        LoRAExpert.random(fusion.target_shapes(), rank=rank, alpha=8.0, dtype=dtype, seed=10 + i)
        for i in range(n)
    ]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_targets_and_shapes(fusion, tiny_base):
    assert fusion.first_layer == 2 and fusion.last_layer == 3
    assert fusion.target_shapes() == {"layers.2.mlp": (64, 64), "layers.3.mlp": (64, 64)}


def test_layer_range_validated(tiny_base):
    with pytest.raises(ValueError, match="above the query layer"):
        ExpertFusion(tiny_base.model, ExpertConfig(first_layer=1), query_layer=1)
    with pytest.raises(ValueError, match="do not fit"):
        ExpertFusion(tiny_base.model, ExpertConfig(last_layer=9), query_layer=1)


def test_no_expert_is_exactly_base(fusion, tiny_base, batch):
    ids, mask = batch
    ref = _logits(tiny_base.model, ids, mask)
    with fusion.routing([[], [], []]):
        out = _logits(tiny_base.model, ids, mask)
    assert torch.equal(out, ref)


def test_mixed_batch_unrouted_rows_exact(fusion, tiny_base, batch):
    ids, mask = batch
    ref = _logits(tiny_base.model, ids, mask)
    e = _experts(fusion, 2)
    with fusion.routing([[e[0]], [], [e[1], e[0]]], torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.7, 0.3]])):
        out = _logits(tiny_base.model, ids, mask)
    assert torch.equal(out[1], ref[1])
    assert not torch.allclose(out[0], ref[0], atol=1e-3)
    assert not torch.allclose(out[2], ref[2], atol=1e-3)
    assert torch.equal(_logits(tiny_base.model, ids, mask), ref)  # the context left nothing behind


def _reference_hooks(fusion, experts, gates):
    """Per-sequence, per-expert Python loop of y = f(x) + sum_k g_k * s_k * B_k A_k x."""
    layers = decoder_layers(fusion.model)
    handles = []
    for name in fusion.targets:
        i = int(name.split(".")[1])

        def hook(mod, args, out, name=name):
            x = args[0]
            out = out.clone()
            for b, seq in enumerate(experts):
                for k, e in enumerate(seq):
                    a, bb = e.float32()[name]
                    a, bb = torch.from_numpy(a), torch.from_numpy(bb)
                    out[b] += float(gates[b][k]) * e.scaling * (x[b] @ a.T) @ bb.T
            return out

        handles.append(layers[i].mlp.register_forward_hook(hook))
    return handles


def test_einsum_matches_loop_reference(fusion, tiny_base, batch):
    ids, mask = batch
    e = _experts(fusion, 2) + [
        LoRAExpert.random(fusion.target_shapes(), rank=2, alpha=3.0, dtype="float32", seed=3)
    ]
    experts = [[e[0], e[2]], [], [e[1]]]  # mixed ranks (4 and 2), K = 2 and 1, one unrouted
    gates = [[0.6, 0.4], [], [1.0]]
    with fusion.routing(experts, torch.tensor([[0.6, 0.4], [0.0, 0.0], [1.0, 0.0]])):
        out = _logits(tiny_base.model, ids, mask)
    handles = _reference_hooks(fusion, experts, gates)
    try:
        ref = _logits(tiny_base.model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_float16_and_bfloat16_experts(fusion, tiny_base, batch):
    ids, mask = batch
    e32 = _experts(fusion, 1)[0]
    with fusion.routing([[e32]] * 3):
        ref = _logits(tiny_base.model, ids, mask)
    for dt in ("float16", "bfloat16"):
        with fusion.routing([[e32.astype(dt)]] * 3):
            out = _logits(tiny_base.model, ids, mask)
        torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_wrong_batch_and_unknown_target(fusion, tiny_base, batch):
    ids, mask = batch
    e = _experts(fusion, 1)[0]
    with fusion.routing([[e], []]), pytest.raises(RuntimeError, match="batch of 2"):
        _logits(tiny_base.model, ids, mask)
    bad = LoRAExpert.random({"layers.1.mlp": (64, 64)}, rank=4, alpha=8.0, seed=0)
    with pytest.raises(ValueError, match="not installed"):
        fusion.prepare([[bad]])


def test_trainable_grads_only_into_target(fusion, tiny_base, batch):
    ids, mask = batch
    frozen, target = _experts(fusion, 2)
    te = fusion.trainable(target)
    other = fusion.trainable(frozen)  # not routed: must get no gradient
    assert all(p.requires_grad for p in te.parameters())
    with fusion.routing([[te], [te, frozen], []], torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])):
        logits = tiny_base.model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = [p.grad for p in te.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in other.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny_base.model.parameters())
    back = te.to_expert()
    assert back.dtype == target.dtype and back.same_weights(target)


def test_trainable_gate_one_matches_frozen(fusion, tiny_base, batch):
    ids, mask = batch
    e = _experts(fusion, 1)[0]
    te = fusion.trainable(e)
    with fusion.routing([[e]] * 3):
        ref = _logits(tiny_base.model, ids, mask)
    with fusion.routing([[te]] * 3):
        out = _logits(tiny_base.model, ids, mask)
    torch.testing.assert_close(out, ref)


def test_lora_form_on_named_linears(tiny_base, batch):
    ids, mask = batch
    f = ExpertFusion(
        tiny_base.model, ExpertConfig(form="lora", target_modules=("q_proj", "v_proj")), query_layer=1
    )
    try:
        shapes = f.target_shapes()
        assert shapes["layers.2.self_attn.q_proj"] == (64, 64)
        assert shapes["layers.3.self_attn.v_proj"] == (64, 32)  # 2 KV heads x 16
        ref = _logits(tiny_base.model, ids, mask)
        e = LoRAExpert.random(shapes, rank=4, alpha=8.0, dtype="float32", seed=1)
        with f.routing([[e], [], []]):
            out = _logits(tiny_base.model, ids, mask)
        assert torch.equal(out[1:], ref[1:])
        assert not torch.allclose(out[0], ref[0], atol=1e-3)
    finally:
        f.remove()


def test_routing_is_thread_local(fusion, tiny_base, batch):
    ids, mask = batch
    ref = _logits(tiny_base.model, ids, mask)
    e = _experts(fusion, 1)[0]
    seen = {}
    with fusion.routing([[e]] * 3):
        t = threading.Thread(target=lambda: seen.setdefault("out", _logits(tiny_base.model, ids, mask)))
        t.start()
        t.join()
    assert torch.equal(seen["out"], ref)


def test_remove_restores_plain_model(tiny_base, batch):
    ids, mask = batch
    ref = _logits(tiny_base.model, ids, mask)
    f = ExpertFusion(tiny_base.model, ExpertConfig(), query_layer=1)
    e = LoRAExpert.random(f.target_shapes(), rank=4, alpha=8.0, seed=0)
    prepared = f.prepare([[e]] * 3, np.ones((3, 1)))
    f.remove()
    with f.activate(prepared):
        assert torch.equal(_logits(tiny_base.model, ids, mask), ref)


def test_peft_adapter_matches_peft_model(tmp_path, make_tiny_model):
    """A PEFT LoRA adapter imported as an expert gives the PEFT model's logits under the lora form."""
    peft = pytest.importorskip("peft")
    from srmoa_dist.experts.peft_io import load_peft_adapter

    model, _ = make_tiny_model()
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[2, 3],
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 40, 99, 5], [1, 8, 9, 10, 11]])
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    expert = load_peft_adapter(tmp_path / "adapter", dtype="float32")
    plain, _ = make_tiny_model()
    f = ExpertFusion(plain, ExpertConfig(form="lora", target_modules=("q_proj", "v_proj")), query_layer=1)
    try:
        with torch.no_grad():
            base = plain(input_ids=ids).logits
            with f.routing([[expert], []]):
                out = plain(input_ids=ids).logits
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1], base[1]) and not torch.allclose(base[0], ref[0], atol=1e-3)
    finally:
        f.remove()
