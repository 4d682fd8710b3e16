"""Which srmoa_dist files one chat request passes through in the model-server replica (Engine.generate),
with a real local Ray runtime (key-store actor, shard actors) and a tiny random Llama; in-process calls
only (the actors' own files run in other processes and are listed apart).

usage: python scripts/request_path.py [TREE]   (TREE: a checkout whose srmoa_dist is imported; default
this one). Prints JSON: the files, the tokenizations (encode_one calls), the calls from model/ back up
into serve/, and every cross-file call edge with its count.
"""
import json
import os
import shutil
import sys
import tempfile

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tree = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else here)
sys.path.insert(0, tree)
sys.path.insert(0, os.path.join(here, "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import conftest  # noqa: E402  (tiny model builders)
import ray  # noqa: E402

import srmoa_dist  # noqa: E402
from srmoa_dist.config import SrmoaConfig  # noqa: E402
from srmoa_dist.experts.expert import LoRAExpert  # noqa: E402
from srmoa_dist.model.generation import queries  # noqa: E402
from srmoa_dist.model.loading import from_model  # noqa: E402
from srmoa_dist.runtime.bootstrap import ensure_actors, init_ray  # noqa: E402
from srmoa_dist.serve.engine import Engine  # noqa: E402

assert srmoa_dist.__file__.startswith(tree), srmoa_dist.__file__
pkg = os.path.dirname(srmoa_dist.__file__)
data = tempfile.mkdtemp(prefix="reqpath-")
cfg = SrmoaConfig.from_dict({
    "data_dir": data,
    "model": {"name_or_path": "tiny", "query_layer": 1, "relation_layer": None, "max_new_tokens": 8,
              "device": "cpu"},
    "store": {"n_shards": 2, "map_size_mb": 16, "max_map_size_mb": 64},
    "keystore": {"d_key": 16, "k": 4, "tau": 0.5},
    "runtime": {"namespace": f"reqpath-{os.getpid()}", "num_cpus": 2, "object_store_memory_mb": 200,
                "actor_cpus": 0.05, "replica_cpus": 0.1}})
tok = conftest.build_tiny_tokenizer()
model = conftest.build_tiny_llama(len(tok), eos_token_id=tok.eos_token_id)
base = from_model(model, tok, cfg.model, name="tiny-random-llama")
init_ray(cfg, log_to_driver=False)
rt = ensure_actors(cfg, trainer=False)
engine = Engine(cfg, rt, base=base)
msgs = [{"role": "user", "content": "What is the capital of Zorbania?"}]
q = queries(base, engine.encoder, [msgs])
[eid] = ray.get(rt.keystore.add.remote(q, True)).tolist()
shapes = engine.fusion.target_shapes()
rt.client().put_many({int(eid): LoRAExpert.random(shapes, cfg.expert.rank, cfg.expert.alpha, cfg.expert.dtype,
                                                  seed=0)})
req = {"messages": msgs, "max_tokens": 4, "temperature": 0}
engine.generate([req])                                      # warm: imports done
engine.client._cache.clear()                                # the traced request fetches from the shards

edges: dict[tuple[str, str], int] = {}
tokenized = {"encode_one": 0}


def rel(f: str) -> str | None:
    return os.path.relpath(f, os.path.dirname(pkg)) if f.startswith(pkg) else None


def prof(frame, event, arg):
    if event != "call":
        return
    callee = rel(frame.f_code.co_filename)
    if callee is None:
        return
    if frame.f_code.co_name == "encode_one":
        tokenized["encode_one"] += 1
    back = frame.f_back
    while back is not None and rel(back.f_code.co_filename) is None:   # through torch/numpy/ray frames
        back = back.f_back
    caller = rel(back.f_code.co_filename) if back is not None else "<outside>"
    if caller != callee:
        edges[(caller, callee)] = edges.get((caller, callee), 0) + 1


sys.setprofile(prof)
[res] = engine.generate([req])
sys.setprofile(None)
assert res["routing"]["expert_ids"] == [eid], res
files = sorted({f for e in edges for f in e if f != "<outside>"})
layer = lambda f: f.split("/")[1]
up = {f"{a} -> {b}": n for (a, b), n in edges.items() if a != "<outside>" and layer(a) == "model"
      and layer(b) == "serve"}
print(json.dumps({"tree": tree, "n_files": len(files), "files": files, "tokenized": tokenized,
                  "calls_from_model_up_into_serve": up,
                  "edges": {f"{a} -> {b}": n for (a, b), n in sorted(edges.items())}}, indent=1))
ray.shutdown()
shutil.rmtree(data, ignore_errors=True)
