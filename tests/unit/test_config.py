"""Root config: defaults, YAML round-trip, and validation errors that name the field and value."""

from __future__ import annotations

import pytest

from srmoa_dist.config import (
    ExpertConfig,
    GravityConfig,
    KeyStoreConfig,
    ModelConfig,
    RuntimeConfig,
    SrmoaConfig,
    StoreConfig,
)


def test_defaults_are_valid_and_paths_hang_off_data_dir(tmp_path):
    cfg = SrmoaConfig(data_dir=str(tmp_path))
    assert cfg.shards_dir == tmp_path / "shards"
    assert cfg.keystore_dir == tmp_path / "keystore"
    assert cfg.expert.scaling == cfg.expert.alpha / cfg.expert.rank


def test_yaml_round_trip(tmp_path):
    cfg = SrmoaConfig(
        data_dir=str(tmp_path / "d"),
        expert=ExpertConfig(rank=8, alpha=16.0, dtype="bfloat16", form="lora", target_modules=("q_proj",)),
        keystore=KeyStoreConfig(d_key=64, index="ivf", nprobe=32, tau=0.4),
        gravity=GravityConfig(alpha=0.1),
    )
    path = tmp_path / "cfg.yaml"
    cfg.save_yaml(path)
    assert SrmoaConfig.load_yaml(path) == cfg


def test_partial_yaml_fills_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("keystore:\n  d_key: 32\nstore:\n  n_shards: 2\n")
    cfg = SrmoaConfig.load_yaml(path)
    assert cfg.keystore.d_key == 32 and cfg.store.n_shards == 2
    assert cfg.model == ModelConfig()


@pytest.mark.parametrize(
    "make, field, value",
    [
        (lambda: ExpertConfig(rank=0), "expert.rank", "0"),
        (lambda: ExpertConfig(dtype="int8"), "expert.dtype", "'int8'"),
        (lambda: StoreConfig(n_shards=-1), "store.n_shards", "-1"),
        (lambda: KeyStoreConfig(index="hnsw"), "keystore.index", "'hnsw'"),
        (lambda: KeyStoreConfig(tau=2.0), "keystore.tau", "2.0"),
        (lambda: GravityConfig(usage_ema=1.0), "gravity.usage_ema", "1.0"),
        (lambda: ModelConfig(device="tpu"), "model.device", "'tpu'"),
        (lambda: RuntimeConfig(invalidation_log=0), "runtime.invalidation_log", "0"),
        (lambda: RuntimeConfig(search_timeout_s=0.0), "runtime.search_timeout_s", "0.0"),
    ],
)
def test_validation_names_field_and_value(make, field, value):
    with pytest.raises(ValueError) as e:
        make()
    assert field in str(e.value) and value in str(e.value)


def test_yaml_errors_name_the_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("keystore:\n  d_kee: 3\n")
    with pytest.raises(ValueError, match="keystore.d_kee"):
        SrmoaConfig.load_yaml(path)
    path.write_text("keystore:\n  d_key: 'big'\n")
    with pytest.raises(ValueError, match="keystore.d_key must be an integer"):
        SrmoaConfig.load_yaml(path)
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        SrmoaConfig.load_yaml(path)


def test_adapters_must_sit_above_the_query_layer():
    with pytest.raises(ValueError, match="expert.first_layer"):
        SrmoaConfig(expert=ExpertConfig(first_layer=3), model=ModelConfig(query_layer=6))
