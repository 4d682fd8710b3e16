"""The PEFT round trip of an expert as served: a real `peft` adapter imported (geometry checked) and
served at gate 1 (a forced expert: the route plan's path) gives PEFT's own greedy tokens; the stored
(float16) expert exported with `save_peft_adapter` loads in `PeftModel.from_pretrained` on a fresh copy
of the base and gives the served tokens again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srmoa_dist.config import ExpertConfig
from srmoa_dist.experts.peft_io import load_peft_adapter, save_peft_adapter
from srmoa_dist.model.generation import (
    GenerationParams,
    encode_messages,
    generate,
    select_experts,
    with_experts,
)
from srmoa_dist.serve.experts_api import check_geometry
from srmoa_dist.serve.route_plan import RoutePlan, apply

peft = pytest.importorskip("peft")

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Tell me a joke about owls"}]]
N_NEW = 8
EID = 7


def _served(base, fusion, enc, expert) -> list[list[int]]:
    """Greedy tokens of the chats with `expert` forced (gate 1), as the engine routes a forced row."""
    plans = [RoutePlan(expert_id=EID)] * len(CHATS)

    def step(xq):
        D, I = apply(plans, None, None, k=4, tau=0.5)
        return with_experts(select_experts(xq, D, I, 0.1), {EID: expert})

    gens = generate(base, fusion, enc, CHATS, params=GenerationParams(max_new_tokens=N_NEW), route_step=step)
    assert all(g.expert_ids == [EID] and g.gates == [1.0] for g in gens)
    return [g.token_ids for g in gens]


def _peft_tokens(model, base) -> list[list[int]]:
    out = []
    for chat in CHATS:                                    # one at a time: no padding differences
        batch = encode_messages(base, [chat])
        with torch.no_grad():
            ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 max_new_tokens=N_NEW, do_sample=False,
                                 eos_token_id=base.tokenizer.eos_token_id,
                                 pad_token_id=base.tokenizer.eos_token_id)
        new = ids[0, batch.input_ids.shape[1]:].tolist()
        out.append([t for t in new if t != base.tokenizer.eos_token_id])
    return out


def test_peft_adapter_in_and_out_gives_the_served_greedy_output(tmp_path, make_tiny_world, make_tiny_model):
    ecfg = ExpertConfig(form="lora", target_modules=("q_proj", "v_proj"), dtype="float16")
    base, fusion, enc = make_tiny_world(ecfg, 16)
    try:
        fresh, _ = make_tiny_model(seed=0)
        lcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                               layers_to_transform=[2, 3], init_lora_weights=False)
        torch.manual_seed(3)
        pm = peft.get_peft_model(fresh, lcfg).eval()
        with torch.no_grad():                            # a strong adapter: greedy tokens must change
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(40.0)
        pm.save_pretrained(tmp_path / "from_peft")

        # in: the importer's geometry check passes, the served expert at gate 1 = PEFT's greedy output
        imported = load_peft_adapter(tmp_path / "from_peft", dtype="float32")
        check_geometry({n: (int(a.shape[1]), int(b.shape[0])) for n, (a, b) in imported.targets.items()},
                       fusion.target_shapes(), ecfg.form)
        served = _served(base, fusion, enc, imported)
        plain = [g.token_ids for g in generate(base, None, None, CHATS,
                                               params=GenerationParams(max_new_tokens=N_NEW))]
        assert served != plain                           # the adapter acts
        assert served == _peft_tokens(pm, base)

        # out: the stored (float16) expert, exported, loads in PEFT on a fresh base: the served tokens
        stored = load_peft_adapter(tmp_path / "from_peft", dtype="float16")
        served16 = _served(base, fusion, enc, stored)
        save_peft_adapter(stored, tmp_path / "exported", base_model_name_or_path="tiny")
        back = peft.PeftModel.from_pretrained(make_tiny_model(seed=0)[0], tmp_path / "exported").eval()
        assert _peft_tokens(back, base) == served16
        again = load_peft_adapter(tmp_path / "exported")
        assert again.same_weights(stored)
        assert np.isclose(again.alpha, 16.0)
    finally:
        fusion.remove()


def test_geometry_mismatch_names_the_field():
    from srmoa_dist.serve.errors import APIError

    installed = {"layers.2.self_attn.q_proj": (64, 64), "layers.3.self_attn.q_proj": (64, 64)}
    with pytest.raises(APIError) as e:
        check_geometry({"layers.2.mlp": (64, 64)}, installed, "lora")
    assert e.value.param == "adapter.target_modules" and "layers.2.mlp" in str(e.value)
    with pytest.raises(APIError) as e:
        check_geometry({"layers.2.self_attn.q_proj": (32, 64)}, installed, "lora")
    assert e.value.param == "adapter.hidden_size" and e.value.status == 400
