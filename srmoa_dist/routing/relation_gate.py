"""The relation gate: which of several experts about one subject a question asks for.

The routing query (`routing.query_encoder`) is dominated by a rare subject's name, so a question about
subject X retrieves every expert trained on X with nearly equal scores, and their blend answers none of
them. The relation of a question is what stays when the subject's name is taken out:

    t' = mask(t, s)                              the subject's name s replaced by a placeholder ("it")
    x  = meanpool_user(h_Lr(t'))          (D,)   layer Lr of the base model, no expert applied
    r  = normalize((x - mu) A)            (D,)   mu, A: the mean and the within-relation whitening of
                                                 masked relation-corpus questions (`fit_within_whitening`)

A whitens the spread between wordings of one relation (the corpus asks each of its relations, which no
benchmark uses, in four wordings), so rewording moves r little and a change of relation moves it much.

An edit's expert carries r of its failing question (`experts.expert.ExpertRelation`, one key a fact).
At routing, when a sequence's candidates hold two or more experts about one subject its text names, only
the one whose relation keys best match the sequence's r stays (`arbitrate`); the others leave that
sequence and the remaining gates are renormalised. Experts without a relation (seed, imported) are left
as the router chose them.

Deferral (`defer_margin`, `model.relation_defer_margin`, 0 by default). The gate also holds a *bank*:
r of every masked corpus question (N, D), relations no edit asks. The best expert of a subject group,
even one alone for its subject, stays only when

    s - max(r Bank^T) > defer_margin,        s = max(r K^T) over the expert's relation keys K (m, D)

that is, when the question is nearer the expert's relation than any other relation the gate knows;
else the group leaves the sequence and the base model answers ("What is the population of X?" after
X's capital was edited). Margin 0 needs no calibration. A corpus relation the expert itself asks (an
edit of "What is the national dish of X?", a corpus wording) is not an other relation: the bank rows
of every corpus relation one of whose rows lies within `same_relation` of one of the expert's keys
(the closest any two corpus relations come, fitted) leave the bank for that expert, else the edit's
own question would tie with its corpus twin and be deferred.

Edited relations (`model.relation_bank_edits`, `edited`). The corpus bank knows only relations no edit
asks. The relation keys of the store's other edits (`routing.relation_bank.EditedRelations`, a mirror
synced from the key store and the records' headers) join the bank for deferral: an unedited "What is
the population of X?" is then nearer another subject's edited population than X's edited capital, and
is deferred. Rows of the expert's own relation (within `same_relation` of its keys: the same relation
edited for another subject) and of other namespaces stay out.

With deferral on, an expert with a relation also leaves every sequence whose text does not name its
subject: an edit of "What is A's profession?" is not about B, however near "What is B's profession?"
routes (two invented names read alike to the router; `bench lifelong` measures this as
`locality_invented`).

Named subjects under tau (`named_slack`, `model.relation_named_slack`; needs deferral). An edit's key is
trained on its failing question's wording, so a paraphrase ("X has its capital in which city?") can
score under tau and never reach the gate, though it names the subject and asks the relation. Routers
then search down to tau - named_slack (`search_slack`), and a candidate scored under tau (the routing's
`tau`, per sequence) stays only when it carries a relation whose subject the text names, and then only
through the deferral above; every other candidate under tau leaves. What tau guards against, queries
about something else, is what the subject check and the deferral decide for those candidates.

Measured offline (SmolLM2-135M, 60 invented entities x 3 facts of `bench.entity_facts`, the key from the
failing question only, Lr 12): a held-out paraphrase picks its own fact among its subject's three 0.98
of the time with A (reg 0.1), 0.89 centred only, and 0.60 with the routing query. An absolute threshold
on s tells a paraphrase (against its own fact's key) from an unedited question about X (against the
best of X's keys) badly: AUC 0.53 centred only, 0.73 with A. The margin to the bank does better, AUC
0.83: at margin 0, 84% of paraphrases stay and 23% of unedited questions (a threshold on s calibrated
on corpus rewordings kept 67-80% and 23-43%). End to end see the README (Results, lifelong).

Shapes: B sequences, T tokens, D model width, m relation keys of an expert, N bank keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from srmoa_dist.experts.expert import ExpertRelation
from srmoa_dist.routing.discriminant import fit_within_whitening
from srmoa_dist.routing.encoder_cache import hash_lower_weights
from srmoa_dist.routing.query_encoder import _pool_prompts
from srmoa_dist.routing.relation_bank import EditedRelations, PinnedSource, RelationSource, unit_rows
from srmoa_dist.routing.relation_corpus import make_relation_corpus, relation_labels

if TYPE_CHECKING:
    from srmoa_dist.model.chat import ChatBatch
    from srmoa_dist.model.generation import BatchRouting
    from srmoa_dist.model.loading import BaseModel

log = logging.getLogger(__name__)

PLACEHOLDER = "it"
_SUBJECT_IN_CORPUS = re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*")


def mask_subject(text: str, subject: str, placeholder: str = PLACEHOLDER) -> str:
    """`text` with every occurrence of `subject` (case-insensitive, with a trailing "'s") replaced."""
    return re.sub(re.escape(subject) + r"(?:'s)?", placeholder, text, flags=re.IGNORECASE)


def names(text: str, subject: str) -> bool:
    """Whether `text` names `subject`: as a whole word or words, case-insensitive ("Zorblax's" names
    Zorblax, "Zorblaxian" does not)."""
    return re.search(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class RelationGate:
    """Relation keys of questions (layer `layer`, centred on `mu`, whitened by `A`) and the arbitration
    between experts."""

    layer: int
    mu: np.ndarray          # (D,) float32
    A: np.ndarray           # (D, D) float32, symmetric
    bank: np.ndarray        # (N, D) float32, unit rows: relation keys of the corpus's questions
    defer_margin: float | None = None   # None: arbitrate only; else also defer (module docstring)
    bank_labels: np.ndarray | None = None   # (N,) int64: each bank row's corpus relation; None: its own
    same_relation: float | None = None      # a bank relation this near an expert's key is its own; None: none
    edited: EditedRelations | None = field(default=None, compare=False, repr=False)   # other edits' relations
    named_slack: float = 0.0                # named subjects may score this much under tau (module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"relation layer must be a non-negative integer, got {self.layer!r}")
        mu = np.asarray(self.mu, dtype=np.float32)
        if mu.ndim != 1 or not np.isfinite(mu).all():
            raise ValueError(f"relation mu must be a finite (D,) vector, got shape {mu.shape}")
        A = np.asarray(self.A, dtype=np.float32)
        if A.shape != (mu.shape[0],) * 2 or not np.isfinite(A).all():
            raise ValueError(f"relation A must be a finite ({mu.shape[0]}, {mu.shape[0]}) matrix, "
                             f"got shape {A.shape}")
        bank = np.asarray(self.bank, dtype=np.float32)
        if (bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] != mu.shape[0]
                or not np.isfinite(bank).all()):
            raise ValueError(f"relation bank must be a finite (N, {mu.shape[0]}) matrix with N >= 1, "
                             f"got shape {bank.shape}")
        if self.defer_margin is not None and (isinstance(self.defer_margin, bool)
                                              or not np.isfinite(float(self.defer_margin))):
            raise ValueError(f"model.relation_defer_margin must be a finite number or null, "
                             f"got {self.defer_margin!r}")
        labels = np.arange(bank.shape[0]) if self.bank_labels is None else np.asarray(self.bank_labels)
        if labels.shape != (bank.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"relation bank_labels must be ({bank.shape[0]},) integers, got shape "
                             f"{labels.shape} of {labels.dtype}")
        if self.same_relation is not None and (isinstance(self.same_relation, bool)
                                               or not -1.0 <= float(self.same_relation) <= 1.0):
            raise ValueError(f"relation same_relation must be a cosine in [-1, 1] or None, "
                             f"got {self.same_relation!r}")
        if (isinstance(self.named_slack, bool) or not isinstance(self.named_slack, (int, float))
                or not 0.0 <= self.named_slack < 1.0):
            raise ValueError(f"model.relation_named_slack must be a number in [0, 1), "
                             f"got {self.named_slack!r}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "bank_labels", labels.astype(np.int64))

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, base: BaseModel, layer: int, *, defer_margin: float | None = None,
            entities_per_kind: int = 10, seed: int = 0, reg: float = 0.1,
            batch_size: int = 32) -> RelationGate:
        """mu, A, the bank and its labels from the masked relation corpus (`entities_per_kind` entities
        of each kind, every relation in four wordings; relations no benchmark uses), and
        `same_relation`: the highest cosine between bank rows of two different relations."""
        n_layers = base.n_layers
        if not 0 <= layer < n_layers:
            raise ValueError(f"model.relation_layer must be in 0..{n_layers - 1} for this model, got {layer} "
                             f"(null turns the relation gate off)")
        corpus, _ = make_relation_corpus(entities_per_kind, seed)
        texts = []
        for q in corpus:
            m = _SUBJECT_IN_CORPUS.findall(q)
            subject = max(m[1:] or m, key=len) if m else ""
            texts.append(mask_subject(q, subject) if subject else q)
        pooled = _pool_prompts(base, texts, batch_size, last_layer=layer)       # (n, D)
        labels = np.asarray(relation_labels(entities_per_kind))
        mu, A = fit_within_whitening(pooled, labels, reg=reg)
        bank = unit_rows((pooled - mu) @ A)                                     # (N, D)
        S = bank @ bank.T                                                        # (N, N)
        other = labels[:, None] != labels[None, :]
        same_relation = float(S[other].max()) if other.any() else None
        return cls(layer, mu, A, bank, defer_margin, labels, same_relation)

    # ------------------------------------------------------------------ encoding
    def encode(self, base: BaseModel, texts: Sequence[str], subjects: Sequence[str]) -> np.ndarray:
        """Relation keys (B, D) float32, unit rows, of user texts with their subjects masked."""
        if len(texts) != len(subjects):
            raise ValueError(f"{len(texts)} texts but {len(subjects)} subjects")
        if not texts:
            return np.zeros((0, self.mu.shape[0]), np.float32)
        masked = [mask_subject(t, s) for t, s in zip(texts, subjects)]
        return unit_rows((_pool_prompts(base, masked, 32, last_layer=self.layer) - self.mu) @ self.A)

    def relation_of(self, base: BaseModel, question: str, subject: str | None,
                    earlier: ExpertRelation | None = None) -> ExpertRelation | None:
        """The relation an edit of `question` about `subject` gives its expert: `earlier` (the refined
        expert's, same subject) plus this question's key; None without a subject."""
        if not subject:
            return earlier
        key = self.encode(base, [question], [subject])                           # (1, D)
        if earlier is not None and earlier.subject.lower() == subject.lower():
            return earlier.plus(key)
        return ExpertRelation(subject, key)

    # ------------------------------------------------------------------ arbitration
    def arbitrate(self, base: BaseModel, batch: ChatBatch, routing: BatchRouting) -> BatchRouting:
        """The routing with, per sequence and per subject its text names, only the candidate whose
        relation keys best match the text, and with `defer_margin` set not even that one unless it
        matches better than every bank relation by the margin, no candidate about a subject the text
        does not name, and none scored under the routing's tau but such a named one (see the module
        docstring)."""
        from srmoa_dist.model.generation import drop_per_row, under_tau

        least = 1 if self.defer_margin is not None else 2       # group size worth a relation key
        under = under_tau(routing)
        if routing.experts is None or not (any(under) or any(len(e) >= least for e in routing.experts)):
            return routing
        texts = _user_texts(base, batch)
        asks: list[tuple[int, list[int]]] = []                  # (row, candidate positions of a subject)
        subjects: list[str] = []
        drop: list[set[int]] = [set() for _ in routing.expert_ids]
        for b, experts in enumerate(routing.experts):
            groups: dict[str, list[int]] = {}
            for j, e in enumerate(experts):
                rel = getattr(e, "relation", None)
                named = rel is not None and names(texts[b], rel.subject)
                if routing.expert_ids[b][j] in under[b] and not (named and self.defer_margin is not None):
                    drop[b].add(routing.expert_ids[b][j])   # under tau, and not a named subject's edit
                elif named:
                    groups.setdefault(rel.subject.lower(), []).append(j)
                elif rel is not None and self.defer_margin is not None:   # about a subject never named
                    drop[b].add(routing.expert_ids[b][j])
            for s, js in groups.items():
                if len(js) >= least:
                    asks.append((b, js))
                    subjects.append(s)
        if not asks:
            return drop_per_row(routing, drop) if any(drop) else routing
        r = self.encode(base, [texts[b] for b, _ in asks], subjects)                   # (n, D)
        deferred = 0
        for (b, js), r_b in zip(asks, r):
            keys = [routing.experts[b][j].relation.keys.astype(np.float32) for j in js]   # (m, D) each
            best = [float(np.max(K @ r_b)) for K in keys]
            i = int(np.argmax(best))
            win = js[i]
            keep = (self.defer_margin is None
                    or best[i] - self.other_relations_best(r_b, keys[i], routing.expert_ids[b][win])
                    > self.defer_margin)
            deferred += not keep
            drop[b] |= {routing.expert_ids[b][j] for j in js if j != win or not keep}
        log.debug("relation gate: %d subject group(s) arbitrated, %d deferred", len(asks), deferred)
        return drop_per_row(routing, drop)

    def other_relations_best(self, r: np.ndarray, K: np.ndarray, expert_id: int | None = None) -> float:
        """max(r Bank^T) (r: (D,)) over the bank rows of relations other than the expert's own, those
        with no row within `same_relation` of a key of K (m, D), and, with `edited` and `expert_id`,
        over other edits' relations too (`EditedRelations.best_other`); -inf when none is left."""
        bank_sims = self.bank @ r                                                # (N,)
        if self.same_relation is not None:
            own_rows = (K @ self.bank.T).max(axis=0) >= self.same_relation       # (N,)
            bank_sims = bank_sims[~np.isin(self.bank_labels, self.bank_labels[own_rows])]
        best = float(bank_sims.max()) if bank_sims.size else float("-inf")
        if self.edited is not None and expert_id is not None:
            best = max(best, self.edited.best_other(r, expert_id, K, self.same_relation))
        return best


def same_subject(expert: Any, subject: str | None) -> bool:
    """Whether an expert's relation is about `subject` (case-insensitive); False without one."""
    rel = getattr(expert, "relation", None)
    return bool(subject) and rel is not None and rel.subject.lower() == subject.lower()


@dataclass(frozen=True)
class GatedEncoder:
    """A query encoder with a relation gate: encodes as the encoder does and arbitrates with the gate
    (what `model.generation` calls between routing and the experts' layers)."""

    encoder: Any
    gate: RelationGate

    def __getattr__(self, name: str) -> Any:      # d_key, check_model, encode_hidden, encode_pooled, ...
        if name.startswith("__") or name in ("encoder", "gate"):   # unpickling looks these up first
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def arbitrate(self, base: BaseModel, batch: ChatBatch, routing: BatchRouting) -> BatchRouting:
        return self.gate.arbitrate(base, batch, routing)


def defers(encoder: Any) -> bool:
    """Whether `encoder` has a relation gate that defers (`model.relation_defer_margin` set): it then
    decides for every edited expert whether a query is about it (subject named, relation nearest)."""
    return isinstance(encoder, GatedEncoder) and encoder.gate.defer_margin is not None


def search_slack(encoder: Any) -> float:
    """How far under tau a router should search for `encoder`: its gate's `named_slack` when the gate
    defers (it then vouches for the candidates under tau it keeps), else 0."""
    return float(encoder.gate.named_slack) if defers(encoder) else 0.0


def edited_of(encoder: Any) -> EditedRelations | None:
    """The mirror of edited relations of `encoder`'s relation gate; None without one."""
    return encoder.gate.edited if isinstance(encoder, GatedEncoder) else None


def sync_edited(encoder: Any, keystore: PinnedSource, store: RelationSource, *, force: bool = True
                ) -> int | None:
    """Sync the mirror of edited relations of `encoder`'s gate (`EditedRelations.sync`), every time with
    `force`, else only when due; None when there is no such mirror (no gate, or `model.relation_bank_edits`
    off) or it was not due."""
    bank = edited_of(encoder)
    if bank is None or not (force or bank.due()):
        return None
    return bank.sync(keystore, store)


def _user_texts(base: BaseModel, batch: ChatBatch) -> list[str]:
    """The last user message of each sequence, decoded from its tokens."""
    tok = base.tokenizer
    B = batch.input_ids.shape[0]
    rows = [batch.input_ids[b][batch.user_mask[b].to(torch.bool)].tolist() for b in range(B)]
    return [tok.decode(ids, skip_special_tokens=True) for ids in rows]


def gated(base: BaseModel, encoder: Any, cache_dir: str | os.PathLike | None = None) -> Any:
    """`encoder` with a relation gate fitted on `base` when `model.relation_layer` is set, else as is;
    the gate defers by `model.relation_defer_margin`, and with `model.relation_bank_edits` weighs other
    edits' relations too (a mirror its callers keep in sync: `sync_edited`). With `cache_dir`, the
    fitted centre, whitening and bank are kept there (keyed by the weights they depend on), so a
    restarted replica does not fit them again."""
    layer = getattr(base.config, "relation_layer", None)
    margin = getattr(base.config, "relation_defer_margin", None)
    slack = float(getattr(base.config, "relation_named_slack", 0.0))
    if layer is None or encoder is None or isinstance(encoder, GatedEncoder):
        return encoder
    path = Path(cache_dir) / f"relation-{_fit_key(base, layer)}.npz" if cache_dir is not None else None
    edited = EditedRelations() if getattr(base.config, "relation_bank_edits", False) else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                same = float(z["same_relation"])                      # nan: None
                gate = RelationGate(layer, z["mu"], z["A"], z["bank"], margin, z["bank_labels"],
                                    same if np.isfinite(same) else None, edited, slack)
            return GatedEncoder(encoder, gate)
        except (OSError, ValueError, KeyError) as e:         # torn or foreign: fit again
            log.warning("ignoring the cached relation gate %s: %s", path, e)
    log.info("fitting the relation gate at layer %d", layer)
    gate = dataclasses.replace(RelationGate.fit(base, layer, defer_margin=margin), edited=edited,
                               named_slack=slack)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
            same = np.nan if gate.same_relation is None else gate.same_relation
            np.savez(tmp, mu=gate.mu, A=gate.A, bank=gate.bank, bank_labels=gate.bank_labels,
                     same_relation=np.float64(same))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not cache the relation gate in %s: %s", path, e)
    return GatedEncoder(encoder, gate)


def _fit_key(base: BaseModel, layer: int) -> str:
    """sha256 over what the fitted gate (centre, whitening, bank, threshold) depends on: the layer, the
    system prompt, the embedding and layers 0..layer."""
    h = hashlib.sha256(repr(("relation-gate", 4, layer, base.d_model, base.system_prompt)).encode())
    hash_lower_weights(h, base, layer)
    return h.hexdigest()[:32]


__all__ = ["PLACEHOLDER", "GatedEncoder", "RelationGate", "gated", "mask_subject", "names", "same_subject",
           "defers", "edited_of", "search_slack", "sync_edited"]
