"""A GRACE-style codebook (Hartvigsen et al., 2023): the `grace` baseline of `bench lifelong`.

One layer of the frozen model is edited, the output of decoder layer L's MLP (`mlp.down_proj`). The
codebook holds per edit a key, a value and a deferral radius:

    key     k_i = x_L at the last prompt token of the failing question          (F,)  down_proj input
    match   i*  = argmin_i ||x_q - k_i||, used only when ||x_q - k_i*|| <= eps_i*
    value   v_i*  replaces down_proj's output at the last prompt token and at every generated token   (D,)

A new key within reach of an entry (||k - k_i|| < eps_i + eps0) that gives another answer splits the two:
both radii become half their distance, as GRACE does; with the same answer the entry's radius grows to
cover the new key and no entry is added. The initial radius eps0 is calibrated the way SR-TTT's tau is
(`calibrate_radius`): at most `false_route_rate` of the generic and near-miss probes fall inside it
around calibration facts' keys, so both methods are held to the same rate of false routes.

A value starts as the layer's own output at the key and is trained (Adam) on the answer tokens of the
edit's 4 training prompts (`ttt.diversify`, the prompts SR-TTT and `shared_lora` train on), with the
value in place from each prompt's last token on, as it is served. Nothing here is served by srmoa-dist:
it is what the benchmark measures SR-TTT against.

Shapes: B sequences, T tokens, F MLP width, D model width, n codebook entries, P training prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]


class GraceCodebook:
    """Keys K (n, F), values V (n, D), radii eps (n,) at layer `layer`'s MLP output (module docstring)."""

    def __init__(self, base: Any, layer: int, eps0: float, *, steps: int = 40, lr: float = 1.0,
                 converge_loss: float = 0.05) -> None:
        check_layer(base, layer)
        if not (np.isfinite(eps0) and eps0 > 0):
            raise ValueError(f"grace eps0 must be a positive distance, got {eps0!r}")
        if steps < 1 or lr <= 0:
            raise ValueError(f"grace steps must be >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
        self.base, self.layer, self.eps0 = base, layer, float(eps0)
        self.steps, self.lr, self.converge_loss = steps, lr, converge_loss
        self._mlp_out = _mlp_out(base, layer)
        F, D = self._mlp_out.in_features, self._mlp_out.out_features
        self.K = torch.zeros(0, F)                 # (n, F)
        self.V = torch.zeros(0, D)                 # (n, D)
        self.eps = torch.zeros(0)                  # (n,)
        self.answers: list[str] = []
        self.splits = self.expansions = 0

    def __len__(self) -> int:
        return len(self.answers)

    def match(self, xq: torch.Tensor) -> torch.Tensor:
        """(B,) the entry each query key (B, F) falls in, -1 for none."""
        if not len(self):
            return torch.full((xq.shape[0],), -1, dtype=torch.long)
        d = torch.cdist(xq.float().cpu(), self.K)                                  # (B, n)
        dmin, i = d.min(dim=1)                                                     # (B,), (B,)
        return torch.where(dmin <= self.eps[i], i, torch.full_like(i, -1))

    # ------------------------------------------------------------------ editing
    def add(self, question: Chat, prompts: Sequence[Any], answer: str) -> dict[str, Any]:
        """One edit: place the question's key in the codebook (add, split or expand), then train the
        value of its entry on `prompts` (`ttt.diversify.TrainingPrompt`s). Returns what it did."""
        x, y = layer_keys(self.base, self.layer, [question])                       # no entry applied
        k, v0 = x[0], y[0]                                                         # (F,), (D,)
        eps, action = self.eps0, "added"
        if len(self):
            d = torch.linalg.vector_norm(self.K - k, dim=1)                        # (n,)
            i = int(d.argmin())
            if float(d[i]) < float(self.eps[i]) + self.eps0:
                if self.answers[i].strip().lower() == answer.strip().lower():
                    self.eps[i] = torch.maximum(self.eps[i], d[i])
                    self.expansions += 1
                    return {"action": "expanded", "entry": i, "steps": 0, "loss_before": None, "loss": None}
                eps = float(d[i]) / 2
                self.eps[i] = min(float(self.eps[i]), eps)
                self.splits += 1
                action = "split"
        self.K = torch.cat([self.K, k[None]])
        self.V = torch.cat([self.V, v0[None]])
        self.eps = torch.cat([self.eps, torch.tensor([eps])])
        self.answers.append(answer)
        steps, loss_before, loss = self._train_value(len(self) - 1, prompts)
        return {"action": action, "entry": len(self) - 1, "steps": steps, "loss_before": loss_before,
                "loss": loss}

    def _train_value(self, i: int, prompts: Sequence[Any]) -> tuple[int, float, float]:
        """Adam on V[i] until the answer loss is under `converge_loss` (`steps` at most); (steps, the loss
        before, the loss after)."""
        from srmoa_dist.ttt.answer_loss import IGNORE, AnswerLoss, lm_batch

        batch = lm_batch(self.base.tokenizer, prompts, self.base.system_prompt, self.base.device)
        labels = batch["labels"]                                                   # (P, T)
        T = labels.shape[1]
        t = torch.arange(T, device=labels.device)
        first = torch.where(labels != IGNORE, t, T).min(dim=1).values                # (P,) 1st answer token
        after = t[None, :] >= (first - 1)[:, None]                    # (P, T) from the last prompt token on
        v = torch.nn.Parameter(self.V[i].clone().to(self.base.device))             # (D,)
        opt = torch.optim.Adam([v], lr=self.lr)

        def put(mod: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            return torch.where(after[:, :, None], v.to(out.dtype), out)            # (P, T, D)

        handle = self._mlp_out.register_forward_hook(put)
        try:
            loss_fn = AnswerLoss(self.base, batch, first_adapted=self.layer)
            losses: list[float] = []
            for steps in range(self.steps + 1):
                out = loss_fn()
                losses.append(float(out.detach()))
                if steps == self.steps or losses[-1] < self.converge_loss:
                    break
                opt.zero_grad(set_to_none=True)
                out.backward()
                opt.step()
        finally:
            handle.remove()
        self.V[i] = v.detach().float().cpu()
        return steps, losses[0], losses[-1]

    # ------------------------------------------------------------------ serving
    @contextmanager
    def _serving(self) -> Iterator[dict[str, Any]]:
        """down_proj's output replaced at position -1 of every forward, by the value of the entry each
        sequence's prefill matched (set `state["prefill"] = True` before each batch's generation)."""
        state: dict[str, Any] = {"prefill": True, "rows": None}

        def put(mod: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if state["prefill"]:                    # the prompt: match on its last token's key
                state["prefill"] = False
                state["rows"] = self.match(args[0][:, -1])                         # (B,)
            rows = state["rows"]
            if rows is None or not bool((rows >= 0).any()):
                return None
            hit = (rows >= 0).to(out.device)[:, None]                              # (B, 1)
            val = self.V[rows.clamp_min(0)].to(out.device, out.dtype)              # (B, D)
            out = out.clone()
            out[:, -1] = torch.where(hit, val, out[:, -1])
            return out

        handle = self._mlp_out.register_forward_hook(put)
        try:
            yield state
        finally:
            handle.remove()

    def generate(self, chats: Sequence[Chat], params: Any, batch_size: int) -> list[Any]:
        """Greedy generations of `chats` (batches of similar length, as `bench.ttt_bench` batches them)
        with the codebook applied."""
        from srmoa_dist.model.generation import generate

        order = sorted(range(len(chats)), key=lambda i: (len(chats[i][-1]["content"]), i))
        out: list[Any] = [None] * len(chats)
        with self._serving() as state:
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                state["prefill"] = True
                gens = generate(self.base, None, None, [chats[i] for i in rows], params=params)
                for i, g in zip(rows, gens):
                    out[i] = g
        return out

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "eps0": self.eps0, "entries": len(self), "splits": self.splits,
                "expansions": self.expansions,
                "eps_p50": float(self.eps.median()) if len(self) else None}


def default_layer(base: Any) -> int:
    """Two thirds of the depth (GRACE edits a late-middle layer), above the query layer."""
    from srmoa_dist.model.fusion import decoder_layers

    n = len(decoder_layers(base.model))
    return min(n - 1, max(base.query_layer + 1, round(2 * n / 3)))


def check_layer(base: Any, layer: int) -> None:
    """ValueError unless `layer` is a decoder layer above the query layer (the value must get gradients
    through `ttt.trainer.AnswerLoss`, which runs only the layers above it)."""
    from srmoa_dist.model.fusion import decoder_layers

    n = len(decoder_layers(base.model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not base.query_layer < layer < n:
        raise ValueError(f"grace layer must be an integer in {base.query_layer + 1}..{n - 1} "
                         f"(above the query layer), got {layer!r}")


def _mlp_out(base: Any, layer: int) -> torch.nn.Linear:
    from srmoa_dist.model.fusion import decoder_layers

    return decoder_layers(base.model)[layer].mlp.down_proj


def layer_keys(base: Any, layer: int, chats: Sequence[Chat], batch_size: int = 32
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of layer `layer`'s down_proj at each chat's last prompt token, (B, F) and
    (B, D), from the prefill serving runs."""
    from srmoa_dist.model.generation import encode_messages, prefill_lower, prefill_upper

    check_layer(base, layer)
    xs, ys = [], []
    got: dict[str, torch.Tensor] = {}

    def capture(mod: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        got["x"], got["y"] = args[0][:, -1].float(), out[:, -1].float()           # (B, F), (B, D)

    handle = _mlp_out(base, layer).register_forward_hook(capture)
    try:
        with torch.no_grad():
            for i in range(0, len(chats), batch_size):
                b = encode_messages(base, list(chats[i:i + batch_size]))
                prefill_upper(base, prefill_lower(base, b.input_ids, b.attention_mask), last_only=True)
                xs.append(got["x"].cpu())
                ys.append(got["y"].cpu())
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def calibrate_radius(base: Any, layer: int, cal_facts: Sequence[Any], negatives: Sequence[str],
                     false_route_rate: float) -> tuple[float, dict[str, Any]]:
    """eps0: at most `false_route_rate` of `negatives` lie nearer than it to a calibration fact's key
    (the key of its failing question), as `routing.query_encoder.calibrate_tau` bounds tau; with the
    recall of those facts' other phrasings (their own key within eps0)."""
    if not 0.0 <= false_route_rate < 1.0:
        raise ValueError(f"false_route_rate must be in [0, 1), got {false_route_rate}")
    if not cal_facts or not negatives:
        raise ValueError("calibrate_radius needs calibration facts and negatives")
    chat = lambda t: [{"role": "user", "content": t}]                              # noqa: E731
    K, _ = layer_keys(base, layer, [chat(f.question) for f in cal_facts])          # (m, F)
    pos_texts = [(j, t) for j, f in enumerate(cal_facts) for t in (*f.train[1:], *f.held_out)]
    Xp, _ = layer_keys(base, layer, [chat(t) for _, t in pos_texts])               # (P, F)
    pos = torch.linalg.vector_norm(Xp - K[[j for j, _ in pos_texts]], dim=1).numpy()   # (P,) own key
    Xn, _ = layer_keys(base, layer, [chat(t) for t in negatives])                  # (N, F)
    neg = np.sort(torch.cdist(Xn, K).min(dim=1).values.numpy())                     # (N,) nearest key
    m = int(np.floor(false_route_rate * neg.size + 1e-9))       # negatives allowed inside
    eps0 = float(np.nextafter(neg[m], np.float32(0))) if m < neg.size else float(neg[-1]) * 2   # bar out
    info = {"method": "distance at the last prompt token to calibration facts' question keys",
            "n_facts": len(cal_facts), "n_positives": int(pos.size), "n_negatives": int(neg.size),
            "false_route_rate": false_route_rate, "eps0": eps0,
            "positive_recall": float((pos <= eps0).mean()), "negative_pass": float((neg <= eps0).mean()),
            "positive_distance_p50_p90": [float(np.percentile(pos, 50)), float(np.percentile(pos, 90))],
            "negative_distance_min_p10": [float(neg[0]), float(np.percentile(neg, 10))]}
    return eps0, info


__all__ = ["GraceCodebook", "calibrate_radius", "default_layer", "layer_keys"]
