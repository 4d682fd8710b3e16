"""Per-request routing: the batch's one search and each row cut to its own k, tau, forced expert."""

import math

import numpy as np
import pytest

from srmoa_dist.model.generation import select_experts
from srmoa_dist.serve.route_plan import FORCED_SCORE, RoutePlan, apply, row_taus, search_args

D = np.array([[0.9, 0.7, 0.5], [0.8, 0.6, 0.4], [0.95, 0.3, 0.2], [0.9, 0.8, 0.7]], np.float32)
I = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], np.int64)


def test_each_row_gets_its_own_k_tau_forced_and_use():
    plans = [RoutePlan(k=1), RoutePlan(tau=0.55), RoutePlan(expert_id=42), RoutePlan(use=False)]
    assert search_args(plans, 3, 0.6) == (3, 0.55, None)
    Dc, Ic = apply(plans, D, I, 3, 0.6)
    assert Ic[0].tolist() == [1, -1, -1]                   # k = 1
    assert Ic[1].tolist() == [4, 5, -1]                    # tau 0.55 keeps 0.6, drops 0.4
    assert Ic[2].tolist() == [42, -1, -1] and Dc[2, 0] == FORCED_SCORE
    assert (Ic[3] == -1).all() and np.isneginf(Dc[3]).all()
    r = select_experts(np.zeros((4, 2), np.float32), Dc, Ic, 0.1)
    assert r.expert_ids[2] == [42] and r.gates[2] == [1.0]


def test_a_slack_cuts_each_row_under_its_own_tau():
    """With the relation gate's slack each row keeps candidates down to its own tau less the slack; the
    routing then carries each row's tau, under which only the gate's named subjects stay."""
    plans = [RoutePlan(), RoutePlan(tau=0.75), RoutePlan(expert_id=42), RoutePlan()]
    Dc, Ic = apply(plans, D, I, 3, 0.6, slack=0.15)
    assert Ic[0].tolist() == [1, 2, 3]                     # 0.5 >= 0.6 - 0.15
    assert Ic[1].tolist() == [4, 5, -1]                    # 0.6 >= 0.75 - 0.15, 0.4 is not
    assert Ic[2].tolist() == [42, -1, -1]
    assert row_taus(plans, 0.6) == [0.6, 0.75, 0.6, 0.6]
    r = select_experts(np.zeros((4, 2), np.float32), Dc, Ic, 0.1, row_taus(plans, 0.6))
    assert r.tau == [0.6, 0.75, 0.6, 0.6] and r.scores[2] == [FORCED_SCORE]


def test_store_defaults_apply_and_no_search_when_nobody_searches():
    Dc, Ic = apply([RoutePlan()] * 4, D, I, 2, 0.6)
    assert Ic[:, 2].tolist() == [-1] * 4 and Ic[2].tolist() == [7, -1, -1]   # k 2, tau 0.6 (0.3 cut)
    assert search_args([RoutePlan(expert_id=1), RoutePlan(use=False)], 3, 0.6) is None
    Dc, Ic = apply([RoutePlan(expert_id=1), RoutePlan(use=False)], None, None, 3, 0.6)
    assert Ic.tolist() == [[1], [-1]] and math.isinf(Dc[1, 0])


def test_namespaces_travel_per_row():
    plans = [RoutePlan(namespaces=("a", "shared")), RoutePlan(), RoutePlan(expert_id=3)]
    assert search_args(plans, 3, 0.6)[2] == [("a", "shared"), None, None]


@pytest.mark.parametrize("req,field", [
    ({"k": 0}, "k"), ({"k": 99}, "k"), ({"k": True}, "k"), ({"tau": 1.5}, "tau"), ({"tau": "x"}, "tau"),
    ({"expert_id": -1}, "expert_id"), ({"expert_id": 3, "use_experts": False}, "use_experts"),
])
def test_bad_plans_name_the_field(req, field):
    with pytest.raises(ValueError, match=field):
        RoutePlan.of(req, max_k=8)


def test_plan_of_a_request():
    p = RoutePlan.of({"k": 2, "tau": 0, "namespaces": ["a", "shared"], "use_experts": True}, max_k=8)
    assert p == RoutePlan(use=True, k=2, tau=0.0, namespaces=("a", "shared"))
