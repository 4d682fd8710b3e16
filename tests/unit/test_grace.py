"""The GRACE-style codebook baseline (`bench.grace`) on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from srmoa_dist.bench.facts import make_facts
from srmoa_dist.bench.grace import GraceCodebook, calibrate_radius, default_layer, layer_keys
from srmoa_dist.model.generation import GenerationParams, generate
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.diversify import diversify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTION = "What is the capital of Qumrania?"
FAR = "Write a short poem about the sea and the wind."


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def prompts_for(question: str, answer: str):
    fail = explicit_failure(question, "I do not know.", correct_answer=answer)
    return diversify(fail, f"The answer is {answer}.")


@pytest.fixture
def tiny(make_tiny_model):
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.loading import from_model

    model, tok = make_tiny_model(seed=0)
    cfg = ModelConfig(name_or_path="tiny", device="cpu", query_layer=1, relation_layer=None, max_new_tokens=6,
                      system_prompt="You are a helpful assistant.")
    return from_model(model, tok, cfg, name="tiny-random-llama")


def test_an_edit_is_trained_and_applied_only_inside_its_radius(tiny):
    layer = default_layer(tiny)
    X, _ = layer_keys(tiny, layer, [chat(QUESTION), chat(FAR)])                  # (2, F)
    gap = float(torch.linalg.vector_norm(X[0] - X[1]))
    book = GraceCodebook(tiny, layer, eps0=gap / 2, steps=30)
    params = GenerationParams(max_new_tokens=6)
    before = generate(tiny, None, None, [chat(QUESTION), chat(FAR)], params=params)

    info = book.add(chat(QUESTION), prompts_for(QUESTION, "Zorblax"), "Zorblax")

    assert info["action"] == "added" and len(book) == 1 and info["steps"] >= 1
    assert info["loss"] < info["loss_before"] - 1.0              # the value learned the answer tokens
    assert book.match(X).tolist() == [0, -1]                     # the question inside, the far prompt out
    after = book.generate([chat(QUESTION), chat(FAR)], params, batch_size=2)
    assert after[0].token_ids != before[0].token_ids             # the edited question answers otherwise
    assert after[1].token_ids == before[1].token_ids             # outside every radius: the base model's
    again = generate(tiny, None, None, [chat(QUESTION)], params=params)
    assert again[0].token_ids == before[0].token_ids             # the codebook's hook is gone after serving


OTHER = "Which city is the capital of Qumrania?"


def key_distance(base, layer: int, a: str, b: str) -> float:
    X, _ = layer_keys(base, layer, [chat(a), chat(b)])                         # (2, F)
    return float(torch.linalg.vector_norm(X[0] - X[1]))


def test_a_key_near_an_entry_with_another_answer_splits_it(tiny):
    book = GraceCodebook(tiny, default_layer(tiny), eps0=1e6, steps=1)
    d = key_distance(tiny, book.layer, QUESTION, OTHER)
    book.add(chat(QUESTION), prompts_for(QUESTION, "Zorblax"), "Zorblax")

    split = book.add(chat(OTHER), prompts_for(OTHER, "Vellum"), "Vellum")
    assert split["action"] == "split" and len(book) == 2 and book.summary()["splits"] == 1
    assert book.eps.tolist() == pytest.approx([d / 2, d / 2], rel=1e-4)        # each keeps its own side


def test_a_key_near_an_entry_with_the_same_answer_grows_it(tiny):
    layer = default_layer(tiny)
    d = key_distance(tiny, layer, QUESTION, OTHER)
    book = GraceCodebook(tiny, layer, eps0=0.75 * d, steps=1)
    book.add(chat(QUESTION), prompts_for(QUESTION, "Zorblax"), "Zorblax")

    grown = book.add(chat(OTHER), prompts_for(OTHER, "zorblax"), "zorblax")    # case does not matter
    assert grown["action"] == "expanded" and len(book) == 1 and book.expansions == 1
    assert book.eps.tolist() == pytest.approx([d], rel=1e-4)                   # now covers the new key
    assert book.match(layer_keys(tiny, layer, [chat(OTHER)])[0]).tolist() == [0]


def test_bad_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="grace layer"):
        GraceCodebook(tiny, tiny.query_layer, eps0=1.0)          # at or under the query layer: no gradient
    with pytest.raises(ValueError, match="grace layer"):
        GraceCodebook(tiny, 99, eps0=1.0)
    with pytest.raises(ValueError, match="eps0"):
        GraceCodebook(tiny, default_layer(tiny), eps0=0.0)
    with pytest.raises(ValueError, match="false_route_rate"):
        calibrate_radius(tiny, default_layer(tiny), make_facts(2, 0), ["Hello"], 1.5)


def test_the_radius_lets_no_negative_in_at_rate_zero(tiny):
    facts = make_facts(4, 0)
    negatives = ["Write a haiku about autumn.", "What is 2 + 2?", "Tell me a joke about cats.",
                 "Translate 'good morning' into French."]
    eps0, info = calibrate_radius(tiny, default_layer(tiny), facts, negatives, 0.0)
    assert eps0 > 0 and info["negative_pass"] == 0.0 and info["n_negatives"] == 4
    assert info["n_positives"] == sum(len(f.train) - 1 + len(f.held_out) for f in facts)
    assert 0.0 <= info["positive_recall"] <= 1.0
