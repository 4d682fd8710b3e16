"""The frozen query encoder: hidden states of layer Lq -> a unit routing query of dimension d_key.

    x  = meanpool_user(h_Lq)          (D,)     mean over the last user message's content tokens
    zw = normalize(P W (x - mu))      (d_w,)   mu: calibration mean; W: fixed seeded orthogonal projection;
                                               P: shrinkage whitening fitted in the projected space
    zd = normalize(L (x - mu_d))      (d_d,)   L: a linear discriminant of facts (`routing.discriminant`)
    q  = [sqrt(1 - w) zw, sqrt(w) zd] (d_key,) unit norm; w = the discriminant's share of the score

so q . k = (1 - w) cos_w + w cos_d for two queries. The whitened block alone (w = 0, d_d = 0, the format
of version 1) is DESIGN.md's recipe: whitening in the projected space (d_w x d_w covariance) is cheap and
worked in the probe; with ~100 calibration prompts the sample covariance is singular, so it is shrunk
toward a scaled identity, ``C_s = (1 - lam) C + lam * tr(C)/d_w * I`` with the Ledoit-Wolf ``lam`` unless
one is given, and ``P = C_s^(-1/2)`` (symmetric, ZCA). Without the centring, every query shares the
direction of the mean hidden state and all inner products crowd near 1.

Why the discriminant block (optional, `model.encoder_discriminant`, off by default): mean-pooled states
are dominated by the entity's name, so a question about entity X scores alike against every key trained
on X ("What is the population of X?" against the key of "What is the capital of X?" scores as high as the
capital question's own paraphrases). `L` is fitted on a corpus of questions about invented entities
whose relations no benchmark uses (`routing.relation_corpus`): it keeps what tells facts apart and
shrinks what only rewords one. Offline (120 entity facts, SmolLM2-135M, Lq 6, keys = the mean of the 4
training prompts' queries) it raised held-out paraphrases routed top-1 to their own fact from 0.67 to
0.80; but it also lifts near-misses (the same relation about a real entity) toward the keys, so a tau
calibrated to pass 1% of near-misses rises (0.58 -> 0.70) and, end to end (`srmoa bench lifelong`, 30
edits), generalization fell from 0.57 to 0.25 while the same-entity leak went from 0.50 to 0.40. Hence
off by default; the README's Results have the figures.

Layer Lq means the output of decoder layer index Lq (HF ``hidden_states[Lq + 1]``); experts are only
attached above it, so the query never depends on the routing.

Everything (mu, W, P, L, mu_d, w and the metadata) is saved in one .npz, so every process computes
bit-identical queries for the same hidden states. The deferral threshold tau is the key store's
(`keystore.tau`); `calibrate_tau` fits it.

Shapes: B batch, T tokens, D model dim, n calibration prompts, d_key = d_w + d_d query dims.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from srmoa_dist.routing.discriminant import fit_discriminant
from srmoa_dist.routing.relation_corpus import make_relation_corpus

if TYPE_CHECKING:
    from srmoa_dist.model.loading import BaseModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)      # version 1: the whitened block only

# Generic everyday prompts that fix mu and P: varied topics, forms and lengths, no invented facts.
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "What is the capital of Japan?",
    "How do I boil an egg so the yolk stays soft?",
    "Can you explain what photosynthesis is?",
    "Write a short poem about the sea.",
    "What's a good way to start learning the guitar?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Give me three ideas for a rainy afternoon.",
    "What is 17 times 23?",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish.",
    "What should I pack for a weekend camping trip?",
    "Who wrote Romeo and Juliet?",
    "How can I improve my sleep?",
    "Explain the difference between weather and climate.",
    "What is a prime number?",
    "Suggest a name for a small bakery.",
    "How do I change a flat tire on a bicycle?",
    "What are the main causes of inflation?",
    "Tell me a fun fact about octopuses.",
    "How long should I steep green tea?",
    "What does a CPU do in a computer?",
    "Summarize the plot of Cinderella in two sentences.",
    "Is it healthy to drink coffee every day?",
    "What's the difference between a virus and a bacterium?",
    "How do I write a polite email asking for a deadline extension?",
    "Which planet is closest to the sun?",
    "What is the boiling point of water at sea level?",
    "How do I make my houseplants grow better?",
    "Explain what a mortgage is in simple terms.",
    "What are some tips for a job interview?",
    "How does a rainbow form?",
    "Recommend a good exercise for back pain.",
    "What is the largest ocean on Earth?",
    "How do I convert Celsius to Fahrenheit?",
    "Why do cats purr?",
    "What is the meaning of the word 'ephemeral'?",
    "Write a haiku about autumn leaves.",
    "How can I save money on groceries?",
    "What is machine learning?",
    "How many continents are there?",
    "What causes earthquakes?",
    "Give me a simple recipe for pancakes.",
    "How do I remove a coffee stain from a shirt?",
    "Who painted the Mona Lisa?",
    "What is the speed of light?",
    "How should I prepare for a marathon?",
    "Explain how a bill becomes a law.",
    "What's the best way to memorize vocabulary?",
    "Why do leaves change color in the fall?",
    "How do airplanes stay in the air?",
    "What is the population of a typical large city?",
    "Can you help me plan a birthday party for a child?",
    "What are the symptoms of dehydration?",
    "How does compound interest work?",
    "Describe a sunset in one sentence.",
    "What is the tallest mountain in the world?",
    "How do I start a vegetable garden?",
    "What is the difference between 'affect' and 'effect'?",
    "How do I make a budget spreadsheet?",
    "Why is exercise good for mental health?",
    "What language is spoken in Brazil?",
    "How do bees make honey?",
    "Tell me a joke about computers.",
    "What is the Pythagorean theorem?",
    "How do I calm down before a presentation?",
    "What's a healthy breakfast option?",
    "How does the internet work, briefly?",
    "What year did the first person walk on the moon?",
    "How can I be more productive when working from home?",
    "What are renewable energy sources?",
    "Explain what DNA is.",
    "How often should I water a cactus?",
    "What is the plural of 'mouse'?",
    "Suggest a book for someone who likes mysteries.",
    "How do I teach my dog to sit?",
    "What is the chemical symbol for gold?",
    "Why do we have time zones?",
    "How do I write a good cover letter?",
    "What is the difference between a lake and a pond?",
    "How does a refrigerator keep food cold?",
    "List three famous composers.",
    "What should I do if I feel a cold coming on?",
    "How do I sort a list in Python?",
    "What is the main ingredient in guacamole?",
    "How do tides work?",
    "Give me advice on learning a new language as an adult.",
    "What is democracy?",
    "How many minutes are in a day?",
    "Why do we dream?",
    "How can I reduce my screen time?",
    "What is a black hole?",
    "How do I fold a paper airplane?",
    "What's the weather usually like in London in spring?",
    "How do I clean a cast iron pan?",
    "Who discovered penicillin?",
    "What are the benefits of reading every day?",
    "How do I choose a good watermelon?",
    "What is the freezing point of water in Fahrenheit?",
    "Write a one-line motto for a running club.",
    "How does recycling help the environment?",
    "What is an adjective? Give an example.",
    "How do I tie a tie?",
    "What are the colors of the rainbow?",
)


@dataclass(frozen=True, eq=False)
class QueryEncoder:
    """Frozen map h_Lq -> q; build with `fit` (pooled vectors) or `calibrate` (a base model)."""

    mu: np.ndarray  # (D,) float32: calibration mean of the pooled hidden states
    W: np.ndarray  # (d_w, D) float32: seeded orthogonal projection
    P: np.ndarray  # (d_w, d_w) float32: shrinkage whitening in the projected space
    query_layer: int
    seed: int
    shrinkage: float  # the lambda used
    model_name: str = ""
    calibration_hash: str = ""  # sha256 of the calibration prompts (identifies the fit)
    L: np.ndarray | None = None  # (d_d, D) float32: discriminant rows; None = the whitened block only
    mu_d: np.ndarray | None = None  # (D,) float32: the discriminant's centre
    discriminant_weight: float = 0.0  # w: the discriminant block's share of the score

    def __post_init__(self) -> None:
        d_w, D = self.W.shape
        if self.mu.shape != (D,) or self.P.shape != (d_w, d_w):
            raise ValueError(
                f"inconsistent encoder shapes: mu {self.mu.shape}, W {self.W.shape}, P {self.P.shape}"
            )
        if (self.L is None) != (self.mu_d is None):
            raise ValueError("the discriminant needs both L and mu_d")
        if self.L is not None and (self.L.ndim != 2 or self.L.shape[1] != D or self.mu_d.shape != (D,)):
            raise ValueError(f"inconsistent discriminant shapes: L {self.L.shape}, mu_d {self.mu_d.shape}")
        w = self.discriminant_weight
        if not 0.0 <= w < 1.0 or (w > 0) != (self.L is not None):
            raise ValueError(f"discriminant_weight must be in (0, 1) with a discriminant, 0 without; "
                             f"got {w!r}")
        # one fused (d_w, D) matrix, computed the same way in every process
        M = (self.P.astype(np.float64) @ self.W.astype(np.float64)).astype(np.float32)
        object.__setattr__(self, "_M", M)

    @property
    def d_key(self) -> int:
        return int(self.W.shape[0]) + (0 if self.L is None else int(self.L.shape[0]))

    @property
    def d_model(self) -> int:
        return int(self.W.shape[1])

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def pool(h: torch.Tensor, user_mask: torch.Tensor) -> torch.Tensor:
        """Mean of h (B, T, D) over the user tokens (B, T) -> (B, D) float32 (zero rows for empty masks)."""
        m = user_mask.to(device=h.device, dtype=torch.float32).unsqueeze(-1)  # (B, T, 1)
        return (h.float() * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)

    def encode_pooled(self, x: np.ndarray) -> np.ndarray:
        """Pooled states (B, D) -> unit queries (B, d_key) float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"pooled states must be (B, {self.d_model}), got {x.shape}")
        q = _unit((x - self.mu) @ self._M.T)  # (B, d_w)
        if self.L is None:
            return q
        zd = _unit((x - self.mu_d) @ self.L.T)  # (B, d_d)
        w = self.discriminant_weight
        return np.concatenate([np.sqrt(1 - w) * q, np.sqrt(w) * zd], axis=1).astype(np.float32)

    def encode_hidden(self, h_Lq: torch.Tensor, user_mask: torch.Tensor) -> np.ndarray:
        """h of layer Lq (B, T, D) and the user-token mask (B, T) -> (B, d_key) float32, unit norm."""
        with torch.no_grad():
            pooled = self.pool(h_Lq, user_mask)
        return self.encode_pooled(pooled.cpu().numpy())

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        pooled: np.ndarray,
        d_key: int,
        *,
        seed: int = 0,
        shrinkage: float | None = None,
        query_layer: int = -1,
        model_name: str = "",
        calibration_hash: str = "",
        corpus: tuple[np.ndarray, np.ndarray] | None = None,
        discriminant_weight: float = 0.5,
    ) -> QueryEncoder:
        """Fit mu and P on pooled calibration states (n, D); W is drawn from `seed`. With `corpus`
        (pooled states (m, D), fact labels (m,)) half of d_key is a discriminant fitted on it, weighted
        `discriminant_weight` in the score."""
        X = np.asarray(pooled, dtype=np.float64)
        n, D = X.shape
        if n < 2:
            raise ValueError(f"need at least 2 calibration vectors, got {n}")
        if d_key <= 0:
            raise ValueError(f"d_key must be positive, got {d_key}")
        L = mu_d = None
        d_w, w = d_key, 0.0
        if corpus is not None:
            if not 0.0 < discriminant_weight < 1.0:
                raise ValueError(f"discriminant_weight must be in (0, 1), got {discriminant_weight!r}")
            if d_key < 2:
                raise ValueError(f"d_key must be >= 2 with a discriminant, got {d_key}")
            d_w, w = d_key - d_key // 2, float(discriminant_weight)
            mu_d, L = fit_discriminant(corpus[0], corpus[1], d_key // 2)
            mu_d, L = mu_d.astype(np.float32), L.astype(np.float32)
        mu = X.mean(0)
        W = orthogonal_projection(D, d_w, seed)  # (d_w, D)
        Z = (X - mu) @ W.T  # (n, d_w)
        lam = ledoit_wolf_shrinkage(Z) if shrinkage is None else float(shrinkage)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {lam}")
        C = Z.T @ Z / (n - 1)
        target = np.trace(C) / d_w
        Cs = (1 - lam) * C + lam * target * np.eye(d_w)
        evals, evecs = np.linalg.eigh(Cs)
        evals = np.maximum(evals, 1e-12 * max(target, 1e-30))
        P = (evecs * evals**-0.5) @ evecs.T  # C_s^(-1/2)
        log.info("query encoder fitted on %d vectors: D=%d, d_key=%d (discriminant %d, weight %.2f), "
                 "shrinkage %.3f", n, D, d_key, d_key - d_w, w, lam)
        return cls(
            mu=mu.astype(np.float32),
            W=W.astype(np.float32),
            P=P.astype(np.float32),
            query_layer=query_layer,
            seed=seed,
            shrinkage=lam,
            model_name=model_name,
            calibration_hash=calibration_hash,
            L=L,
            mu_d=mu_d,
            discriminant_weight=w,
        )

    @classmethod
    def calibrate(
        cls,
        base: BaseModel,
        d_key: int,
        *,
        prompts: Sequence[str] | None = None,
        seed: int | None = None,
        shrinkage: float | None = None,
        batch_size: int = 16,
        discriminant_weight: float | None = None,
        corpus_entities: int | None = None,
    ) -> QueryEncoder:
        """Fit on a base model: each prompt is one user message under the model's system prompt. With
        discriminant_weight > 0, the discriminant is fitted on `make_relation_corpus(corpus_entities)`.
        None: the model config's calibration_seed, encoder_discriminant and encoder_corpus_entities."""
        prompts = list(CALIBRATION_PROMPTS if prompts is None else prompts)
        mc = base.config
        seed = mc.calibration_seed if seed is None else seed
        discriminant_weight = mc.encoder_discriminant if discriminant_weight is None else discriminant_weight
        corpus_entities = mc.encoder_corpus_entities if corpus_entities is None else corpus_entities
        corpus = None
        h = hashlib.sha256("\n".join(prompts).encode())
        if discriminant_weight > 0:
            texts, labels = make_relation_corpus(corpus_entities, seed)
            corpus = (_pool_prompts(base, texts, batch_size), np.asarray(labels))
            h.update(f"\ncorpus {corpus_entities} {seed} {discriminant_weight}".encode())
        return cls.fit(
            _pool_prompts(base, prompts, batch_size),
            d_key,
            seed=seed,
            shrinkage=shrinkage,
            query_layer=base.query_layer,
            model_name=base.name,
            calibration_hash=h.hexdigest(),
            corpus=corpus,
            discriminant_weight=discriminant_weight,     # used only with a corpus
        )

    def check_model(self, base: BaseModel) -> None:
        """Raise if this encoder was fitted for another layer or model width."""
        if self.query_layer != base.query_layer or self.d_model != base.d_model:
            raise ValueError(
                f"query encoder fitted for layer {self.query_layer}, D={self.d_model} ({self.model_name!r}); "
                f"the model has query layer {base.query_layer}, D={base.d_model} ({base.name!r})"
            )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        D = self.d_model
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format_version=np.int64(FORMAT_VERSION),
                mu=self.mu,
                W=self.W,
                P=self.P,
                query_layer=np.int64(self.query_layer),
                seed=np.int64(self.seed),
                shrinkage=np.float64(self.shrinkage),
                model_name=np.str_(self.model_name),
                calibration_hash=np.str_(self.calibration_hash),
                L=np.zeros((0, D), np.float32) if self.L is None else self.L,
                mu_d=np.zeros(D, np.float32) if self.mu_d is None else self.mu_d,
                discriminant_weight=np.float64(self.discriminant_weight),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QueryEncoder:
        with np.load(Path(path), allow_pickle=False) as z:
            version = int(z["format_version"])
            if version not in READABLE_VERSIONS:
                raise ValueError(f"{path}: query encoder format {version}, "
                                 f"expected one of {READABLE_VERSIONS}")
            has_d = version >= 2 and z["L"].shape[0] > 0
            return cls(
                mu=z["mu"],
                W=z["W"],
                P=z["P"],
                query_layer=int(z["query_layer"]),
                seed=int(z["seed"]),
                shrinkage=float(z["shrinkage"]),
                model_name=str(z["model_name"]),
                calibration_hash=str(z["calibration_hash"]),
                L=z["L"] if has_d else None,
                mu_d=z["mu_d"] if has_d else None,
                discriminant_weight=float(z["discriminant_weight"]) if has_d else 0.0,
            )




def _unit(z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), float32."""
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _pool_prompts(base: BaseModel, prompts: Sequence[str], batch_size: int, *,
                  last_layer: int | None = None) -> np.ndarray:
    """Pooled layer-Lq (or `last_layer`) states (n, D) of single-turn prompts under the model's system
    prompt (mean over the user tokens, `QueryEncoder.pool`)."""
    from srmoa_dist.model.generation import encode_messages, prefill_lower

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch_size]]
            batch = encode_messages(base, chats)
            lower = prefill_lower(base, batch.input_ids, batch.attention_mask, last_layer=last_layer)
            out.append(QueryEncoder.pool(lower.hidden, batch.user_mask).cpu().numpy())
    return np.concatenate(out)


def orthogonal_projection(d_in: int, d_out: int, seed: int) -> np.ndarray:
    """(d_out, d_in) float64 with orthonormal rows (d_out <= d_in) or columns (d_out > d_in), from `seed`."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((max(d_in, d_out), min(d_in, d_out)))
    Q, R = np.linalg.qr(G)  # (max, min) orthonormal columns
    Q = Q * np.sign(np.where(np.diag(R) == 0, 1.0, np.diag(R)))  # unique signs
    return Q.T if d_out <= d_in else Q


def ledoit_wolf_shrinkage(Z: np.ndarray) -> float:
    """Ledoit-Wolf (2004) intensity of shrinking the covariance of centred rows Z (n, d) to mu*I."""
    n, d = Z.shape
    S = Z.T @ Z / n
    m = np.trace(S) / d
    d2 = np.sum((S - m * np.eye(d)) ** 2)
    if d2 <= 0:
        return 1.0
    b2 = sum(np.sum((np.outer(z, z) - S) ** 2) for z in Z) / n**2
    return float(min(1.0, b2 / d2))


def calibrate_tau(
    pos_scores: np.ndarray | Sequence[float],
    neg_scores: np.ndarray | Sequence[float],
    false_route_rate: float,
) -> float:
    """The deferral threshold: at most `false_route_rate` of the negatives score >= tau.

    Negatives must include near-misses (same relation, another entity), not only unrelated prompts.
    tau sits just above the highest negative that must fail; when positives are given it moves up to the
    middle of the gap between that negative and the lowest positive above it (same recall on the
    calibration set, a margin on both sides). Scores are inner products of unit vectors, tau in [-1, 1].
    """
    if not 0.0 <= false_route_rate < 1.0:
        raise ValueError(f"false_route_rate must be in [0, 1), got {false_route_rate}")
    neg = np.sort(np.asarray(neg_scores, dtype=np.float32).ravel())[::-1]
    if neg.size == 0:
        raise ValueError("calibrate_tau needs negative scores")
    m = int(np.floor(false_route_rate * neg.size + 1e-9))  # negatives allowed to pass
    if m >= neg.size:
        return -1.0
    bar = neg[m]  # this one and every lower negative must fail
    tau = np.nextafter(bar, np.float32(np.inf))
    pos = np.asarray(pos_scores, dtype=np.float32).ravel()
    above = pos[pos > bar]
    if above.size:
        tau = max(tau, np.float32((float(bar) + float(above.min())) / 2))
    tau = float(np.clip(tau, -1.0, 1.0))
    if pos.size:
        recall = float((pos >= tau).mean())
        log.info(
            "tau %.4f: %d/%d negatives pass (rate %.4f), recall of positives %.3f",
            tau,
            int((neg >= tau).sum()),
            neg.size,
            float((neg >= tau).mean()),
            recall,
        )
        if recall < 0.5:
            log.warning("tau %.4f keeps only %.0f%% of the positives", tau, 100 * recall)
    return tau
