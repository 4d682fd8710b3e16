"""The prefix-shared pooling equals the plain batched pooling of the query encoder."""

import numpy as np

from srmoa_dist.routing.prompt_pool import pooled_prompts
from srmoa_dist.routing.query_encoder import _pool_prompts

PROMPTS = ["What is the capital of France?", "Why is the sky blue?", "Tell me a joke about cats.",
           "How do I boil an egg?", "You are a pirate. Answer briefly!", "dogs 0123"]


def test_pooled_prompts_match_the_plain_path(tiny_base):
    fast = pooled_prompts(tiny_base, PROMPTS, batch_size=4)
    plain = _pool_prompts(tiny_base, PROMPTS, 3)
    assert fast.shape == (len(PROMPTS), tiny_base.d_model) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-5)
    assert np.abs(fast[0] - fast[1]).max() > 1e-3          # different prompts, different states


def test_pooled_prompts_of_nothing(tiny_base):
    assert pooled_prompts(tiny_base, []).shape == (0, tiny_base.d_model)
