"""The serving engine without Serve or a store (runtime None): one pass, one batch whatever the sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from srmoa_dist.config import KeyStoreConfig, ServeConfig, SrmoaConfig
from srmoa_dist.model.sampling_defaults import SamplingDefaults, sampling_defaults
from srmoa_dist.serve.engine import Engine

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
JOKE = [{"role": "user", "content": "Tell me a joke"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, make_tiny_model):
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.loading import from_model

    model, tok = make_tiny_model(seed=0)
    mcfg = ModelConfig(name_or_path="tiny", device="cpu", query_layer=1, relation_layer=None,
                       max_new_tokens=8, system_prompt="You are a helpful assistant.")
    cfg = SrmoaConfig(data_dir=str(tmp_path_factory.mktemp("engine")), model=mcfg,
                      keystore=KeyStoreConfig(d_key=16), serve=ServeConfig(max_prompt_tokens=64))
    return Engine(cfg, None, base=from_model(model, tok, mcfg, name="tiny-random-llama"))


def _one(engine: Engine, req: dict) -> dict:
    [res] = engine.generate([req])
    assert "error" not in res, res
    return res


def test_mixed_sampling_runs_as_one_batch_and_matches_each_alone(engine):
    reqs = [
        {"messages": CHAT, "max_tokens": 6, "temperature": 1.3, "seed": 7},
        {"messages": JOKE, "max_tokens": 3},
        {"messages": CHAT, "max_tokens": 8, "temperature": 0.9, "top_p": 0.8, "seed": 1},
        {"messages": JOKE, "max_tokens": 8, "temperature": 0, "stop": ["zzz-never"]},
    ]
    solo = [_one(engine, r) for r in reqs]
    b0 = engine.batches
    got = engine.generate(reqs)
    assert engine.batches == b0 + 1                                   # one batched forward, not four
    assert [r["text"] for r in got] == [r["text"] for r in solo]
    assert [r["completion_tokens"] for r in got] == [r["completion_tokens"] for r in solo]
    assert got[1]["completion_tokens"] <= 3 and got[0]["completion_tokens"] <= 6
    # the same seed gives the same text whatever batch it is in (another batch, another position)
    again = engine.generate([{"messages": JOKE, "max_tokens": 8, "temperature": 1.0, "seed": 3}, reqs[0]])
    assert again[1]["text"] == solo[0]["text"]
    assert got[0]["routing"] == {"expert_ids": [], "scores": [], "gates": [], "deferred": True,
                                 "use_experts": True, "skipped": [], "degraded": False,
                                 "degraded_reason": None, "forced": False}


def test_bad_requests_answer_alone(engine):
    long = [{"role": "user", "content": "word " * 200}]
    got = engine.generate([{"messages": long}, {"messages": []}, {"messages": CHAT, "top_p": 2.0},
                           {"messages": CHAT, "max_tokens": 4}])
    assert got[0]["error"]["code"] == "context_length_exceeded" and got[0]["error"]["status"] == 400
    assert "at most 64" in got[0]["error"]["message"]
    assert got[1]["error"]["code"] == "invalid_value" and got[1]["error"]["param"] == "messages"
    assert got[2]["error"]["status"] == 400 and "top_p" in got[2]["error"]["message"]
    assert got[3]["text"] == _one(engine, {"messages": CHAT, "max_tokens": 4})["text"]


def test_stream_equals_batch(engine):
    req = {"messages": CHAT, "max_tokens": 6, "temperature": 1.1, "seed": 5}
    items = list(engine.stream(req))
    final = items[-1]
    assert "".join(i["delta"] for i in items[:-1]) == final["text"] == _one(engine, req)["text"]
    assert final["prompt_tokens"] == _one(engine, req)["prompt_tokens"]


def test_the_length_check_counts_the_ids_generation_reports(engine):
    from srmoa_dist.model.chat import encode_one, with_system

    ids, _, _ = encode_one(engine.base.tokenizer, with_system(CHAT, engine.base.system_prompt))
    assert _one(engine, {"messages": CHAT, "max_tokens": 2})["prompt_tokens"] == len(ids)
    limit = dataclasses.replace(engine.cfg.serve, max_prompt_tokens=len(ids))
    engine.cfg = engine.cfg.replace(serve=limit)
    try:
        assert "error" not in engine.generate([{"messages": CHAT, "max_tokens": 2}])[0]
        engine.cfg = engine.cfg.replace(serve=dataclasses.replace(limit, max_prompt_tokens=len(ids) - 1))
        assert engine.generate([{"messages": CHAT}])[0]["error"]["code"] == "context_length_exceeded"
    finally:
        engine.cfg = engine.cfg.replace(serve=dataclasses.replace(limit, max_prompt_tokens=64))


# -- /v1/completions parity: a raw prompt (no chat template), the model's sampling defaults --------

PROMPT = "The quick brown fox"


def test_a_raw_prompt_is_tokenized_as_is_and_continued_as_hf_greedy_does(engine):
    tok = engine.base.tokenizer
    p = engine.prepare({"prompt": PROMPT, "max_tokens": 6})
    ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    assert p.row[0] == ids                                   # no template, no system prompt
    assert tok.convert_tokens_to_ids("<|im_start|>") not in p.row[0]
    assert all(p.row[1]) and not any(p.row[2])               # the whole prompt is the user's
    [res] = engine.generate([{"prompt": PROMPT, "max_tokens": 6}])
    assert "error" not in res, res
    with torch.no_grad():
        ref = engine.base.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                         max_new_tokens=6, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
    new = ref[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert res["text"] == tok.decode(new, skip_special_tokens=True)
    assert res["prompt_tokens"] == len(ids)
    chat = engine.generate([{"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6}])[0]
    assert chat["prompt_tokens"] > len(ids)                  # the chat route still templates


def test_a_bad_raw_prompt_names_the_prompt(engine):
    [res] = engine.generate([{"prompt": ""}])
    assert res["error"]["param"] == "prompt" and res["error"]["status"] == 400
    [res] = engine.generate([{"prompt": "word " * 200}])
    assert res["error"]["code"] == "context_length_exceeded" and res["error"]["param"] == "prompt"


def test_generation_config_defaults_fill_what_the_request_omits(engine):
    saved = engine.sampling
    try:
        engine.sampling = SamplingDefaults(temperature=0.7, top_p=0.9, max_tokens=5)
        p = engine.prepare({"prompt": PROMPT}).params
        assert (p.temperature, p.top_p, p.max_new_tokens) == (0.7, 0.9, 5)
        p = engine.prepare({"prompt": PROMPT, "temperature": 0, "top_p": 0.5, "max_tokens": 3}).params
        assert (p.temperature, p.top_p, p.max_new_tokens) == (0.0, 0.5, 3)     # the request wins
        engine.sampling = SamplingDefaults()
        p = engine.prepare({"prompt": PROMPT, "default_max_tokens": 16}).params
        assert (p.temperature, p.top_p, p.max_new_tokens) == (0.0, 1.0, 16)    # greedy, the route's 16
        p = engine.prepare({"messages": [{"role": "user", "content": "hi"}]}).params
        assert p.max_new_tokens == engine.cfg.model.max_new_tokens
    finally:
        engine.sampling = saved


def test_the_engine_reads_the_models_generation_config(engine):
    assert engine.sampling == sampling_defaults(engine.base.model.generation_config)
