"""The training copy of the upper layers: routed as the model, cast once, the model left as it was."""

from __future__ import annotations

import pytest
import torch

from srmoa_dist.config import ExpertConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.model.training_copy import TrainingCopy, training_copy
from srmoa_dist.ttt.answer_loss import AnswerLoss, first_stepped_layer, lm_batch, train_autocast
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.diversify import diversify

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(make_tiny_world):
    base, fusion, _ = make_tiny_world(ExpertConfig(rank=4, alpha=8.0), 16)
    failure = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")
    prompts = diversify(failure, "Paris is the capital of France.")          # 4 rows, left padded
    batch = lm_batch(base.tokenizer, prompts, base.system_prompt)
    yield base, fusion, batch
    fusion.remove()


def _loss_and_grads(base, fusion, batch, upper, dtype):
    te = fusion.trainable(LoRAExpert.random(fusion.target_shapes(), 4, 8.0, "float32", seed=3))
    with fusion.routing([[te]] * batch["input_ids"].shape[0]), train_autocast(dtype, "cpu"):
        loss = AnswerLoss(base, batch, upper=upper)()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in te.parameters()]


def test_a_float32_copy_is_routed_and_masked_as_the_model(world):
    """Same loss and gradients as the model's own layers: the fusion's hooks came with the copy, and
    its eager attention gets an additive mask that pads as the model's SDPA mask does."""
    base, fusion, batch = world
    assert (batch["attention_mask"] == 0).any()                                  # padding is exercised
    start = first_stepped_layer(base, fusion.first_layer)
    upper = TrainingCopy(fusion, start, torch.float32)
    assert upper.config._attn_implementation == "eager"
    want, want_g = _loss_and_grads(base, fusion, batch, None, torch.float32)
    got, got_g = _loss_and_grads(base, fusion, batch, upper, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_a_bfloat16_copy_casts_its_linears_once_and_leaves_the_model_as_it_was(world):
    base, fusion, batch = world
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    impl = base.model.config._attn_implementation
    start = first_stepped_layer(base, fusion.first_layer)
    upper = TrainingCopy(fusion, start, torch.bfloat16)
    linears = [m for m in upper.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    norms = [p for n, p in upper.layers.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)               # as autocast runs them
    assert upper.head_weight.dtype == torch.bfloat16
    d = base.model.config.hidden_size              # a norm's output is cast once, for its readers
    assert upper.layers[0].input_layernorm(torch.randn(1, 3, d)).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in upper.layers.parameters())
    # the model: same tensors, same dtype, same attention
    for n, p in base.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    assert base.model.config._attn_implementation == impl
    # bf16 on the copy follows bf16 autocast on the model within bf16 rounding
    want, _ = _loss_and_grads(base, fusion, batch, None, torch.bfloat16)
    got, _ = _loss_and_grads(base, fusion, batch, upper, torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_one_copy_per_fusion_start_and_dtype(world):
    base, fusion, _ = world
    start = first_stepped_layer(base, fusion.first_layer)
    a = training_copy(fusion, start, torch.bfloat16)
    assert training_copy(fusion, start, torch.bfloat16) is a
    assert training_copy(fusion, start + 1, torch.bfloat16) is not a


def test_a_copy_starting_elsewhere_than_the_steps_is_refused(world):
    base, fusion, batch = world
    start = first_stepped_layer(base, fusion.first_layer)
    with pytest.raises(ValueError, match="start must be a layer"):
        TrainingCopy(fusion, 99, torch.bfloat16)
    with pytest.raises(ValueError, match="training copy starts at layer"):
        AnswerLoss(base, batch, upper=training_copy(fusion, start + 1, torch.bfloat16))
