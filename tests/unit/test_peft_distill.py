"""The approximate PEFT export of a parallel-MLP expert (experts/peft_distill.py): a LoRA on each adapted
layer's mlp.down_proj fitted to the served expert. The fit on the tiny random Llama; bad input; and on
the real SmolLM2, the exported directory loaded by real `peft` gives the served greedy output (gate 1,
through the engine's generation path) on the expert's own prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srmoa_dist.config import ExpertConfig, KeyStoreConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.peft_distill import REPORT_NAME, DistillConfig, PeftDistiller
from srmoa_dist.experts.peft_io import CONFIG_NAME, load_peft_adapter

peft = pytest.importorskip("peft")

OWN = ["Which river flows through the invented city of Brellin?", "Name the river of Brellin."]
GENERIC = ["What is the capital of France?", "Tell me a joke about cats", "How do I boil an egg?",
           "Why is the sky blue?", "You are a pirate. Answer briefly.", "The quick brown fox"]
HELD_OUT = ["Tell me a joke about dogs", "What is the capital of Italy?"]


@pytest.fixture(scope="module")
def tiny(make_tiny_model, one_torch_thread):
    """(base, fusion) over a private tiny random Llama: parallel MLP adapters on layers 2..3."""
    from srmoa_dist.config import ModelConfig
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.loading import from_model

    model, tok = make_tiny_model(seed=0)
    base = from_model(model, tok, ModelConfig(name_or_path="tiny", device="cpu", query_layer=1,
                                              relation_layer=None, max_new_tokens=8,
                                              system_prompt="You are a helpful assistant."))
    fusion = ExpertFusion(base.model, ExpertConfig(), query_layer=1)
    yield base, fusion
    fusion.remove()


def _expert(fusion, seed=3, b_std=0.2) -> LoRAExpert:
    return LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=8.0, dtype="float16", seed=seed,
                             b_std=b_std)


def test_the_fit_recovers_a_target_linear_in_the_down_proj_input(tiny):
    base, fusion = tiny
    d = PeftDistiller(base, fusion, _expert(fusion), DistillConfig(ridge=1e-8))
    g = torch.Generator().manual_seed(0)
    caps = {}
    for n in d.mlps:
        Z = torch.randn(300, 128, generator=g)
        caps[n] = (Z, Z @ torch.randn(4, 128, generator=g).T)     # Y = M z exactly
    lora, residual = d.fit(caps)
    assert set(lora.targets) == {"layers.2.mlp.down_proj", "layers.3.mlp.down_proj"}
    assert lora.rank == 4 and lora.alpha == 8.0 and lora.shapes["layers.2.mlp.down_proj"] == (128, 64)
    assert max(residual.values()) < 1e-4
    # B is the expert's, unchanged
    np.testing.assert_array_equal(lora.targets["layers.3.mlp.down_proj"][1],
                                  d.expert.float32()["layers.3.mlp"][1])


def test_export_of_the_tiny_model_fits_and_loads_in_peft(tiny, tmp_path):
    base, fusion = tiny
    d = PeftDistiller(base, fusion, _expert(fusion), DistillConfig(max_new_tokens=8))
    served = d.served_greedy([[{"role": "user", "content": p}] for p in OWN])
    plain = d.greedy(base.model, d.prompt_ids([[{"role": "user", "content": p}] for p in OWN]), served=False)
    assert served != plain                                         # the expert acts
    rep = d.run(OWN, GENERIC, HELD_OUT, tmp_path / "out", base_model_name_or_path="tiny")
    assert rep.form == "parallel_mlp" and not rep.exact and rep.fit_tokens > 100
    assert set(rep.residual) == {"layers.2.mlp", "layers.3.mlp"}
    # the random tiny MLP is far from linear in n: a partial fit, still far better than none (1.0)
    assert max(rep.residual.values()) < 0.6
    assert rep.own.prompts == 2 and rep.held_out.prompts == 2 and 0 <= rep.own.tokens <= 1
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["own"] == {"prompts": 2, "exact": rep.own.exact, "tokens": rep.own.tokens}
    cfg = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert cfg["target_modules"] == ["down_proj"] and cfg["layers_to_transform"] == [2, 3]
    assert load_peft_adapter(tmp_path / "out").rank == 4


def test_bad_input_is_refused_naming_the_field(tiny, tmp_path):
    base, fusion = tiny
    lora = LoRAExpert.random({"layers.2.self_attn.q_proj": (64, 64)}, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="not parallel MLP targets"):
        PeftDistiller(base, fusion, lora)
    with pytest.raises(ValueError, match="not installed"):
        PeftDistiller(base, fusion, LoRAExpert.random({"layers.0.mlp": (64, 64)}, rank=4, alpha=8.0))
    with pytest.raises(ValueError, match="distill.ridge"):
        DistillConfig(ridge=0)
    with pytest.raises(ValueError, match="distill.max_new_tokens"):
        DistillConfig(max_new_tokens=0)
    d = PeftDistiller(base, fusion, _expert(fusion))
    with pytest.raises(ValueError, match="own prompts"):
        d.run([], GENERIC, HELD_OUT, tmp_path / "x")
    with pytest.raises(ValueError, match="answers"):
        d.run(OWN, [], [], tmp_path / "x", answers=[[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match="layers.2.mlp"):
        d.fit({n: (torch.zeros(5, 128), torch.zeros(4, 4)) for n in d.mlps})


def test_smollm2_parallel_expert_export_loads_in_peft_with_the_served_greedy_output(
        smollm2_base, smollm2_cache_dir, tmp_path, one_torch_thread):
    """Real SmolLM2, a strong parallel expert (it changes the greedy answers), exported by the fit:
    `PeftModel.from_pretrained` on a fresh copy of the base gives the served expert's greedy tokens
    (forced, gate 1, the engine's generation path) on the expert's own prompts."""
    import copy

    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.generation import GenerationParams, generate, select_experts, with_experts
    from srmoa_dist.routing.encoder_cache import calibrated
    from srmoa_dist.serve.route_plan import RoutePlan, apply

    base = smollm2_base
    fusion = ExpertFusion(base.model, ExpertConfig(), base.query_layer)
    try:
        e = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=8.0, dtype="float16", seed=5, b_std=0.3)
        enc = calibrated(base, KeyStoreConfig().d_key, smollm2_cache_dir)   # cached: no calibration
        chats = [[{"role": "user", "content": p}] for p in OWN]
        n_new = 8

        def step(xq):
            D, I = apply([RoutePlan(expert_id=9)] * len(chats), None, None, k=4, tau=0.5)
            return with_experts(select_experts(xq, D, I, 0.1), {9: e})

        params = GenerationParams(max_new_tokens=n_new)
        gens = generate(base, fusion, enc, chats, params=params, route_step=step)
        assert all(g.gates == [1.0] for g in gens)
        served = [g.token_ids for g in gens]
        plain = [g.token_ids for g in generate(base, None, None, chats, params=params)]
        assert served != plain                                   # the expert acts

        d = PeftDistiller(base, fusion, e, DistillConfig(max_new_tokens=n_new))
        rep = d.run(OWN, GENERIC[:4], HELD_OUT, tmp_path / "out", base_model_name_or_path="smollm2")
        assert rep.own.exact == 1.0 and rep.base_own.exact < 1.0
        assert sorted(rep.residual, key=lambda n: int(n.split(".")[1]))[0] == "layers.7.mlp"

        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "out").eval()
        got = []
        for chat in chats:                                       # PEFT's own generate, one at a time
            ids = torch.tensor([d.prompt_ids([chat])[0]])
            with torch.no_grad():
                out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                  do_sample=False, eos_token_id=base.tokenizer.eos_token_id,
                                  pad_token_id=base.tokenizer.eos_token_id)
            got.append([t for t in out[0, ids.shape[1]:].tolist() if t != base.tokenizer.eos_token_id])
        assert got == served
    finally:
        fusion.remove()


def test_fit_prompts_of_an_edit_come_from_its_live_ledger_records():
    from srmoa_dist.serve.adapter_export import fit_prompts

    msgs = [{"role": "user", "content": "Where is Brellin?"}]
    edits = [{"status": "committed", "question": "Where is Brellin?",
              "prompts": [{"structure": "direct", "messages": msgs, "target": "In Veloria."}]},
             {"status": "rolled_back", "question": "Old question?", "prompts": []}]
    own, answers = fit_prompts(["Where is Brellin?", "  "], edits)
    assert own == ["Where is Brellin?"]              # the same chat once; blank and rolled-back left out
    assert answers == [[*msgs, {"role": "assistant", "content": "In Veloria."}]]
