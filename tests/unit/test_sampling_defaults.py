"""Sampling defaults from a model's generation_config: only what the file sets explicitly counts."""

from __future__ import annotations

import dataclasses

import pytest

from srmoa_dist.model.sampling_defaults import SamplingDefaults, sampling_defaults


def test_sampling_defaults_take_only_what_the_file_sets(tmp_path):
    from transformers import GenerationConfig

    assert sampling_defaults(None) == SamplingDefaults()
    assert sampling_defaults(GenerationConfig(bos_token_id=1, eos_token_id=2)) == SamplingDefaults()
    GenerationConfig(temperature=0.6, top_p=0.95, max_new_tokens=40, do_sample=True).save_pretrained(tmp_path)
    got = sampling_defaults(GenerationConfig.from_pretrained(tmp_path))
    assert got == SamplingDefaults(temperature=0.6, top_p=0.95, max_tokens=40)
    assert sampling_defaults({"temperature": 0.3}) == SamplingDefaults(temperature=0.3)
    with pytest.raises(ValueError, match="top_p"):
        sampling_defaults({"top_p": 1.5})
    assert dataclasses.asdict(got) == got.as_dict()
