"""Fitted query encoders kept on disk, keyed by everything the fit depends on.

Fitting the discriminant runs ~2,200 corpus prompts through layers 0..Lq (a minute or more on two CPU
cores), and the result is a pure function of the model's lower layers, the system prompt, d_key and the
calibration settings. So each new store on a machine reuses the first fit: `calibrated(base, d_key,
cache_dir)` is `QueryEncoder.calibrate(base, d_key)` through ``cache_dir/<key>.npz``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srmoa_dist.routing.query_encoder import CALIBRATION_PROMPTS, FORMAT_VERSION, QueryEncoder

if TYPE_CHECKING:
    from srmoa_dist.model.loading import BaseModel

log = logging.getLogger(__name__)


def fit_key(base: BaseModel, d_key: int) -> str:
    """sha256 over the weights of the embedding and layers 0..Lq, the system prompt and the settings."""
    h = hashlib.sha256()
    mc = base.config
    h.update(repr((FORMAT_VERSION, base.query_layer, base.d_model, d_key, base.system_prompt,
                   mc.calibration_seed, mc.encoder_discriminant, mc.encoder_corpus_entities,
                   CALIBRATION_PROMPTS)).encode())
    hash_lower_weights(h, base, base.query_layer)
    return h.hexdigest()[:32]


def hash_lower_weights(h: Any, base: BaseModel, last_layer: int) -> None:
    """Feed the embedding's and layers 0..last_layer's weights into the hash `h`."""
    from srmoa_dist.model.fusion import decoder_layers

    for m in [base.model.model.embed_tokens, *decoder_layers(base.model)[: last_layer + 1]]:
        for name, p in m.named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())


def calibrated(base: BaseModel, d_key: int, cache_dir: str | os.PathLike) -> QueryEncoder:
    """What `QueryEncoder.calibrate(base, d_key)` would fit, from cache_dir when it was fitted before."""
    path = Path(cache_dir) / f"encoder-{fit_key(base, d_key)}.npz"
    if path.is_file():
        try:
            enc = QueryEncoder.load(path)
            log.info("query encoder from the cache %s", path)
            return enc
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:   # torn or foreign: fit again
            log.warning("ignoring the cached query encoder %s: %s", path, e)
    enc = QueryEncoder.calibrate(base, d_key)
    try:
        enc.save(path)                                    # atomic: temp file + rename
    except OSError as e:
        log.warning("could not cache the query encoder in %s: %s", path, e)
    return enc


__all__ = ["calibrated", "fit_key", "hash_lower_weights"]
