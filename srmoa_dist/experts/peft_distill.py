"""A parallel-MLP expert as a PEFT LoRA on ``mlp.down_proj``: a fitted, approximate export.

A parallel expert adds ``s * B A n`` to the output of each adapted layer's MLP, where n is the MLP's
input (the post-attention norm of the residual) and s = alpha / r. PEFT has no such layer: it adapts
linear modules. The linear that writes the MLP's output is ``mlp.down_proj``; its input
z = act(gate_proj n) * up_proj n is a function of n, but not a linear one, so no exact conversion
exists. Per layer we fit a LoRA on down_proj, ``s * B A' z ~= s * B A n``, keeping B and alpha (same
rank, same scaling), with A' the ridge least-squares map over tokens captured while the *served*
expert is applied at gate 1 (every layer's input follows the served trajectory):

    A' = Y Z^T (Z Z^T + lam I)^-1,    Y = A N,    lam = ridge * T * median_t ||z_t||^2 / d_z

A higher exported rank cannot fit better: the unconstrained least-squares map W = (s B A N) Z^+ has
rank <= r already, and B' = B, A' = A N Z^+ is that map. So the closed form is the optimum of the
layer-local objective; what it cannot do is represent the part of B A n that is not linear in z.

    PeftDistiller(base, fusion, expert)         validates the expert (parallel MLP targets, installed)
      .served_greedy(chats)                     greedy ids of the served expert (gate 1)
      .capture(token_rows)                      per layer (Z, Y) over every real token
      .fit(captures)                            the down_proj LoRAExpert and each layer's residual
      .agreement(model, chats, reference)       greedy agreement of another model with the reference
      .run(own, generic, held_out, out_dir)     all of it, plus the real ``peft`` check; the report

`run` writes the adapter (``save_peft_adapter``) and ``srmoa_export.json`` (the `DistillReport`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srmoa_dist.experts.expert import LoRAExpert

log = logging.getLogger(__name__)

REPORT_NAME = "srmoa_export.json"
METHOD = "ridge_down_proj"
_PARALLEL = re.compile(r"^layers\.(\d+)\.mlp$")

Message = dict[str, str]
Chat = Sequence[Message]

# Generic prompts the fit also covers, so that the export mimics the served expert off its topic too.
GENERIC_PROMPTS: tuple[str, ...] = (
    "What is the capital of Japan?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Tell me a joke about cats.",
    "Write a haiku about the sea.",
    "What is the boiling point of water?",
    "Explain photosynthesis in one sentence.",
    "Who painted the Mona Lisa?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "How do you say hello in Spanish?",
    "What is 7 times 8?",
    "Name three primary colors.",
    "What is the tallest mountain on Earth?",
    "Summarize the story of Cinderella.",
    "What does a thermometer measure?",
    "Recommend a good book for a long flight.",
    "What is the chemical symbol for gold?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle work?",
    "What year did the Second World War end?",
    "What is the main ingredient of guacamole?",
)


@dataclass(frozen=True)
class DistillConfig:
    """ridge: lam relative to a typical token's ||z||^2 / d_z (times T); max_new_tokens: the served greedy
    continuation appended to each fit prompt (and the length compared for agreement)."""

    ridge: float = 5e-2
    max_new_tokens: int = 16
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise ValueError(f"distill.ridge must be a positive number, got {self.ridge!r}")
        for name in ("max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"distill.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Agreement:
    """Greedy agreement over prompts: `exact` the share of prompts whose first n greedy tokens are
    identical; `tokens` the mean share of those n tokens before the first difference."""

    prompts: int
    exact: float
    tokens: float


@dataclass(frozen=True)
class DistillReport:
    """What an export of a parallel expert is and how close it comes (``srmoa_export.json``)."""

    form: str
    method: str
    exact: bool
    rank: int
    alpha: float
    ridge: float
    fit_tokens: int
    max_new_tokens: int
    residual: dict[str, float]               # per layer: ||s B (A'Z - A N)|| / ||s B A N||, fit tokens
    own: Agreement | None = None             # PeftModel vs the served expert, the expert's own prompts
    held_out: Agreement | None = None        # the same on generic prompts left out of the fit
    base_own: Agreement | None = None        # the plain base model vs the served expert (how much it acts)
    base_held_out: Agreement | None = None
    seconds: dict[str, float] = field(default_factory=dict)   # fit (greedy, capture, solve), measure
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def as_chat(prompt: str | Chat) -> list[Message]:
    """A prompt (one user turn) or a chat as a list of messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("a fit prompt must not be empty")
        return [{"role": "user", "content": prompt}]
    chat = [dict(m) for m in prompt]
    if not chat:
        raise ValueError("a fit chat must have at least one message")
    return chat


class PeftDistiller:
    """Fits a down_proj LoRA to one parallel expert on one base model (see the module docstring).

    `base` is a `model.loading.BaseModel`, `fusion` the `ExpertFusion` installed on it (form
    parallel_mlp); the expert is applied through the fusion at gate 1, as a forced expert is served."""

    def __init__(self, base: Any, fusion: Any, expert: LoRAExpert, cfg: DistillConfig | None = None) -> None:
        from srmoa_dist.model.fusion import decoder_layers

        self.base, self.fusion, self.expert = base, fusion, expert
        self.cfg = cfg or DistillConfig()
        if not isinstance(expert, LoRAExpert):
            raise ValueError(f"expert must be a LoRAExpert, got {type(expert).__name__}")
        bad = [n for n in expert.targets if not _PARALLEL.match(n)]
        if bad:
            raise ValueError(f"expert targets {bad[:3]} are not parallel MLP targets ('layers.<i>.mlp'); "
                             "a LoRA-form expert exports exactly with save_peft_adapter")
        installed = fusion.target_shapes()
        missing = [n for n in expert.targets if n not in installed]
        if missing:
            raise ValueError(f"expert targets {missing[:3]} are not installed on this model "
                             f"(installed: {sorted(installed)[:3]}...)")
        layers = decoder_layers(base.model)
        self.layers = {n: int(_PARALLEL.match(n).group(1)) for n in expert.targets}
        self.mlps = {n: layers[i].mlp for n, i in self.layers.items()}
        for n, mlp in self.mlps.items():
            if not isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
                raise ValueError(f"{n} has no linear down_proj to carry a LoRA")
        tok = base.tokenizer
        from srmoa_dist.model.generation import eos_ids

        self.eos = eos_ids(base)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos, default=0)

    # -- 1. the served expert's greedy output -----------------------------------------------------------
    def prompt_ids(self, chats: Sequence[Chat]) -> list[list[int]]:
        """Templated token ids of each chat (the model's system prompt; a generation prompt unless the
        chat ends with an assistant answer)."""
        from srmoa_dist.model.chat import encode_one, with_system

        return [list(encode_one(self.base.tokenizer, with_system(c, self.base.system_prompt))[0])
                for c in chats]

    def greedy(self, model: Any, rows: Sequence[list[int]], *, served: bool) -> list[list[int]]:
        """Greedy continuations (cut at EOS, at most max_new_tokens) of token rows by the HF causal LM
        `model`, batched with left padding; with the served expert at gate 1 when `served`."""
        out: list[list[int]] = []
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i : i + self.cfg.batch_size]
            ids, mask = self._pad(chunk)
            ctx = self.fusion.routing([[self.expert]] * len(chunk)) if served else nullcontext()
            with ctx:
                out.extend(_greedy(model, ids, mask, self.cfg.max_new_tokens, self.eos))
        return out

    def served_greedy(self, chats: Sequence[Chat]) -> list[list[int]]:
        return self.greedy(self.base.model, self.prompt_ids(chats), served=True)

    # -- 2. capture ------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, rows: Sequence[list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target: (Z (T, d_z) the down_proj inputs, Y (T, r) = A n) over every real token of the
        rows, with the served expert applied at gate 1 (float32, CPU)."""
        if not rows:
            raise ValueError("capture needs at least one token row")
        f32 = self.expert.float32()
        A = {n: torch.from_numpy(np.ascontiguousarray(f32[n][0])) for n in self.mlps}
        zs: dict[str, list[torch.Tensor]] = {n: [] for n in self.mlps}
        ys: dict[str, list[torch.Tensor]] = {n: [] for n in self.mlps}

        def on_mlp(name: str):
            def hook(_m, args):
                ys[name].append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu() @ A[name].T)
            return hook

        def on_down(name: str):
            def hook(_m, args):
                zs[name].append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())
            return hook

        handles = []
        for n, mlp in self.mlps.items():
            handles.append(mlp.register_forward_pre_hook(on_mlp(n)))
            handles.append(mlp.down_proj.register_forward_pre_hook(on_down(n)))
        try:
            for i in tqdm(range(0, len(rows), self.cfg.batch_size), desc="capture", leave=False,
                          disable=len(rows) <= self.cfg.batch_size):
                chunk = rows[i : i + self.cfg.batch_size]
                ids, mask = self._pad(chunk)
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                with self.fusion.routing([[self.expert]] * len(chunk)):
                    self.base.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                    logits_to_keep=1)
                real = mask.reshape(-1).bool().cpu()          # drop the padding now, not at the end
                for n in self.mlps:
                    zs[n][-1], ys[n][-1] = zs[n][-1][real], ys[n][-1][real]
        finally:
            for h in handles:
                h.remove()
        return {n: (torch.cat(zs[n]), torch.cat(ys[n])) for n in self.mlps}

    # -- 3. fit ----------------------------------------------------------------------------------------
    def fit(self, captures: dict[str, tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[LoRAExpert, dict[str, float]]:
        """The down_proj LoRAExpert (float32; B and alpha of the expert) and each layer's relative
        residual on the captured tokens."""
        f32 = self.expert.float32()
        targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        residual: dict[str, float] = {}
        for n in self.mlps:
            if n not in captures:
                raise ValueError(f"captures lack target {n!r}")
            Z, Y = (t.double() for t in captures[n])
            if Z.ndim != 2 or Y.ndim != 2 or Z.shape[0] != Y.shape[0] or Z.shape[0] == 0:
                raise ValueError(f"captures[{n!r}] must be (T, d_z) and (T, r) with T >= 1, got "
                                 f"{tuple(Z.shape)} and {tuple(Y.shape)}")
            B = torch.from_numpy(np.ascontiguousarray(f32[n][1])).double()
            if Y.shape[1] != B.shape[1]:
                raise ValueError(f"captures[{n!r}]: Y has {Y.shape[1]} columns, the expert's rank is "
                                 f"{B.shape[1]}")
            G = Z.T @ Z
            # the ridge's scale: the median token, not the mean (a few tokens, such as the first of the
            # system prompt, carry activations 1000x the others in some layers; the mean would let them
            # set lam and leave the layer unfit)
            typical = float((Z * Z).sum(1).median())
            lam = self.cfg.ridge * Z.shape[0] * typical / Z.shape[1] + 1e-12
            G.diagonal().add_(lam)
            A2 = torch.linalg.solve(G, Z.T @ Y).T                            # (r, d_z)
            err = ((Z @ A2.T - Y) @ B.T).norm()
            residual[n] = float(err / ((Y @ B.T).norm() + 1e-30))
            targets[f"{n}.down_proj"] = (A2.float().numpy(), B.float().numpy())
        return LoRAExpert.from_float(targets, self.expert.alpha, "float32"), residual

    # -- 4. measure ------------------------------------------------------------------------------------
    def agreement(self, model: Any, rows: Sequence[list[int]], reference: Sequence[list[int]]) -> Agreement:
        """Greedy ids of `model` on the rows against the reference continuations."""
        got = self.greedy(model, rows, served=False)
        return _agreement(got, reference, self.cfg.max_new_tokens)

    def peft_model(self, adapter_dir: str | Path) -> Any:
        """The exported adapter loaded by real ``peft`` on a copy of the base (the fusion inert on it)."""
        import peft

        twin = copy.deepcopy(self.base.model)
        return peft.PeftModel.from_pretrained(twin, str(adapter_dir)).eval()

    @staticmethod
    def decoder(peft_model: Any) -> Any:
        """The HF model inside a PeftModel, its linears replaced by PEFT's LoRA layers (what
        `greedy` runs: PeftModel's own generate adds nothing for greedy decoding)."""
        return peft_model.get_base_model()

    # -- all of it -------------------------------------------------------------------------------------
    def run(self, own: Sequence[str | Chat], generic: Sequence[str | Chat], held_out: Sequence[str | Chat],
            out_dir: str | Path, *, answers: Sequence[str | Chat] = (),
            base_model_name_or_path: str | None = None) -> DistillReport:
        """Fit on own + generic prompts (each with the served greedy continuation) and on `answers`
        (chats ending with an assistant answer: an edit's training prompts), write the adapter and the
        report to out_dir, and measure the PEFT model's agreement on own and held-out prompts."""
        from srmoa_dist.experts.peft_io import save_peft_adapter

        if not own:
            raise ValueError("own prompts must not be empty: the expert's prompts are what it is fit on")
        own_c = [as_chat(p) for p in own]
        gen_c = [as_chat(p) for p in generic]
        held_c = [as_chat(p) for p in held_out]
        ans_c = [as_chat(p) for p in answers]
        for c in ans_c:
            if c[-1]["role"] != "assistant":
                raise ValueError("answers must be chats that end with an assistant message")
        t0 = time.perf_counter()
        own_rows, gen_rows = self.prompt_ids(own_c), self.prompt_ids(gen_c)
        held_rows = self.prompt_ids(held_c)
        own_ref = self.greedy(self.base.model, own_rows, served=True)
        gen_ref = self.greedy(self.base.model, gen_rows, served=True)
        fit_rows = [p + c for p, c in zip(own_rows + gen_rows, own_ref + gen_ref)] + self.prompt_ids(ans_c)
        captures = self.capture(fit_rows)
        lora, residual = self.fit(captures)
        out = Path(out_dir)
        save_peft_adapter(lora, out, base_model_name_or_path=base_model_name_or_path)
        t1 = time.perf_counter()
        report = DistillReport(
            form="parallel_mlp", method=METHOD, exact=False, rank=lora.rank, alpha=lora.alpha,
            ridge=float(self.cfg.ridge), fit_tokens=int(next(iter(captures.values()))[0].shape[0]),
            max_new_tokens=self.cfg.max_new_tokens, residual=residual,
            notes=("a LoRA on mlp.down_proj fitted to the parallel expert (ridge least squares over "
                   "tokens of the served trajectory); approximate: see the agreement figures",))
        try:
            pm = self.peft_model(out)
        except ImportError:
            log.warning("peft is not installed: the export's agreement is not measured")
            report = replace(report, notes=(*report.notes, "peft not installed: agreement not measured"))
        else:
            held_ref = self.greedy(self.base.model, held_rows, served=True) if held_rows else []
            report = replace(
                report,
                own=self.agreement(self.decoder(pm), own_rows, own_ref),
                held_out=self.agreement(self.decoder(pm), held_rows, held_ref) if held_rows else None,
                base_own=self.agreement(self.base.model, own_rows, own_ref),
                base_held_out=self.agreement(self.base.model, held_rows, held_ref) if held_rows else None)
            del pm
        seconds = {"fit": round(t1 - t0, 3), "measure": round(time.perf_counter() - t1, 3)}
        report = replace(report, seconds=seconds)
        (out / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2))
        log.info("exported a parallel expert as a down_proj LoRA: residual max %.3f, own %s, held-out %s",
                 max(residual.values()), report.own, report.held_out)
        return report

    # -- internals -------------------------------------------------------------------------------------
    def _pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, T - len(r) :] = 1
        return ids.to(self.base.device), mask.to(self.base.device)


@torch.no_grad()
def _greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: set[int]) -> list[list[int]]:
    """Greedy decoding with a KV cache (positions from the mask, as serving counts them)."""
    from transformers import DynamicCache

    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    B = ids.shape[0]
    toks: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(n):
        nxt = res.logits[:, -1].argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                if t in eos:
                    done[b] = True
                else:
                    toks[b].append(t)
        if all(done) or step == n - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
    return toks


def _agreement(got: Sequence[list[int]], want: Sequence[list[int]], n: int) -> Agreement:
    if len(got) != len(want):
        raise ValueError(f"{len(got)} continuations against {len(want)} references")
    if not want:
        return Agreement(prompts=0, exact=1.0, tokens=1.0)
    exact, share = 0, 0.0
    for g, w in zip(got, want):
        g, w = g[:n], w[:n]
        exact += g == w
        common = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        share += 1.0 if g == w else common / max(len(g), len(w), 1)
    return Agreement(prompts=len(want), exact=exact / len(want), tokens=share / len(want))


__all__ = ["Agreement", "DistillConfig", "DistillReport", "GENERIC_PROMPTS", "PeftDistiller", "REPORT_NAME",
           "as_chat"]
