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


def test_resolve_file_then_overrides_then_data_dir(tmp_path):
    from srmoa_dist.config import CONFIG_FILE, resolve

    store = tmp_path / "store"
    store.mkdir()
    (store / CONFIG_FILE).write_text("data_dir: /elsewhere\nserve:\n  port: 9123\n  host: 0.0.0.0\n"
                                     "keystore:\n  tau: 0.4\n")
    cfg = resolve(store)
    assert (cfg.data_dir, cfg.serve.port, cfg.serve.host) == (str(store), 9123, "0.0.0.0")
    assert cfg.keystore.tau == 0.4
    cfg = resolve(store, overrides={"serve": {"port": 8001}, "keystore": {"k": 3}})
    assert (cfg.serve.port, cfg.serve.host, cfg.keystore.tau, cfg.keystore.k) == (8001, "0.0.0.0", 0.4, 3)
    other = tmp_path / "other.yaml"
    other.write_text("serve:\n  port: 7000\n")
    cfg = resolve(store, other)                                  # an explicit file wins over data_dir's
    assert (cfg.serve.port, cfg.serve.host, cfg.data_dir) == (7000, "127.0.0.1", str(store))
    assert cfg.keystore.tau == 0.6
    assert resolve(None, other).data_dir == SrmoaConfig().data_dir
    empty = tmp_path / "empty"                                   # no file: `default`, else the defaults
    assert resolve(empty) == SrmoaConfig(data_dir=str(empty))
    default = SrmoaConfig(keystore=KeyStoreConfig(k=5))
    assert resolve(empty, default=default) == default.replace(data_dir=str(empty))
    with pytest.raises(ValueError, match="serve.port must be an integer, got 'x'"):
        resolve(store, overrides={"serve": {"port": "x"}})
    with pytest.raises(ValueError, match="unknown config field"):
        resolve(store, overrides={"serve": {"prot": 1}})
    with pytest.raises(ValueError, match="overrides must be a mapping"):
        resolve(store, overrides=["serve"])


def test_store_cli_and_app_resolve_alike(tmp_path):
    """load_config, the CLI's options and build_app's args all go through `resolve`; build_args
    round-trips a config exactly."""
    from srmoa_dist.cli import _config
    from srmoa_dist.config import CONFIG_FILE
    from srmoa_dist.runtime.store_init import load_config
    from srmoa_dist.serve.app import config_from_args
    from srmoa_dist.serve.local import build_args

    store = tmp_path / "store"
    store.mkdir()
    (store / CONFIG_FILE).write_text("serve:\n  port: 9123\nmodel:\n  max_new_tokens: 12\n")
    assert load_config(store) == _config(store, None) == config_from_args({"data_dir": str(store)})
    cli = _config(store, None, "tiny", port=None, host="::1")
    app = config_from_args({"data_dir": str(store), "model": "tiny", "overrides": {"serve": {"host": "::1"}}})
    assert cli == app and (cli.serve.port, cli.serve.host, cli.model.name_or_path) == (9123, "::1", "tiny")
    cfg = SrmoaConfig(data_dir=str(store), expert=ExpertConfig(target_modules=("q_proj",), form="lora"),
                      keystore=KeyStoreConfig(tau=0.3))
    assert config_from_args(build_args(cfg)) == cfg                 # every field, tuples included


def test_serve_host_and_port_override_the_yaml_only_when_given(tmp_path):
    from typer.testing import CliRunner

    from srmoa_dist.cli import app
    from srmoa_dist.config import CONFIG_FILE

    store = tmp_path / "store"
    store.mkdir()
    (store / CONFIG_FILE).write_text("serve:\n  host: 0.0.0.0\n  port: 9123\n")

    def shown(*opts: str) -> SrmoaConfig:
        r = CliRunner().invoke(app, ["serve", "--data-dir", str(store), "--show-config", *opts])
        assert r.exit_code == 0, r.output
        path = tmp_path / "shown.yaml"
        path.write_text(r.output)
        return SrmoaConfig.load_yaml(path)

    addr = lambda *opts: (shown(*opts).serve.host, shown(*opts).serve.port)      # noqa: E731
    assert addr() == ("0.0.0.0", 9123)
    assert addr("--port", "8001") == ("0.0.0.0", 8001)
    assert addr("--host", "127.0.0.1") == ("127.0.0.1", 9123)
    assert addr("--host", "::1", "--port", "8002") == ("::1", 8002)
    assert shown("--api-key", "sekrit").serve.api_key is None       # keys are never printed
