"""APOLLO / APOLLO-Mini and the staged-update optimizer API the training worker uses.

What: optimizers that *compute* an update without writing it, so loop can apply it atomically while vLLM
is paused (see loop/worker/update.py), and a per-layer mode that never holds all gradients at once.

APOLLO (Zhu et al. 2024, arXiv 2412.05270, "SGD-like memory, AdamW-level performance"), written here from
the paper's algorithm (the `apollo-torch` package is CC-BY-NC and is deliberately not used):
  for a 2-D weight W (m x n) with gradient G, and a Gaussian projection P (entries N(0, 1/r)) regenerated
  from a seed every `proj_gap` steps (only the seed is stored):
    R  = P G           (r x n, projecting the smaller side; the transposed form when m > n)
    M, V <- AdamW moments of R, kept in the low-rank space (2 r max(m, n) floats instead of 2 m n)
    R~ = M^ / (sqrt(V^) + eps)                       the low-rank Adam update
    s  = ||R~_c|| / ||R_c|| per channel c ("channel") or ||R~|| / ||R|| ("tensor")
    G~ = alpha * s * G                               the full-rank raw gradient, rescaled
    norm-growth limiter: if ||G~_t|| > gamma ||G~_{t-1}||, shrink G~_t to gamma ||G~_{t-1}||
    W <- W - lr G~ - lr wd W                         (decoupled weight decay)
APOLLO-Mini = rank 1 + tensor-wise scaling + alpha = sqrt(128). Moments are kept when the projection is
regenerated (the paper does not reset them; the scaling factor is a ratio of norms, which is robust to the
change of basis). A 3-D weight (a mixture of experts' fused E x m x n experts) is a stack of matrices: each
expert gets its own low-rank state, scaling and limiter norm (Apollo._update_stacked), never AdamW's two fp32
copies of every expert. Everything else that is not a matrix, or whose rank would not be lower, gets plain AdamW.

The staged API (same for "apollo", "apollo-mini", "adamw", "sgd" via make_optimizer):
  deltas = opt.compute_updates()   # {param: delta to ADD}; params and committed state untouched
  ... check_updates / apply_updates_ ...
  opt.commit()  or  opt.discard()  # a refused apply leaves the optimizer exactly as before the step
Deltas have the parameter's dtype: the staged update of a bf16 model then costs 1x the weight bytes, not 2x,
and the rounding of the delta itself (relative 2^-9) is far below the stochastic rounding of the sum.

Embeddings and lm_head are frozen by default (trainable_parameters): with a 150k vocabulary their AdamW
state alone would be ~0.6x the weight bytes, and preference tuning moves them little. If trained, they get
the same low-rank APOLLO state as other matrices.

Run the tests: .venv/bin/pytest tests/unit/worker/test_apollo.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Delta = dict[torch.Tensor, torch.Tensor]
OnUpdate = Callable[[torch.Tensor, torch.Tensor], None]

_SEED_MIX = 0x9E3779B1  # decorrelates the projections of neighbouring parameters / intervals


class StagedOptimizer(torch.optim.Optimizer):
    """Base: subclasses give `_update(p, grad, state, group) -> (delta, new_state)`; never mutate `state`."""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._pending: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self._index = {p: i for i, p in enumerate(self._all_params())}
        self.tp: Any = None  # loop/worker/tp.py's TP when the parameters are tensor-parallel slices

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter is not managed by this optimizer")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_index"):  # groups added after construction get indices too
            self._index = {p: i for i, p in enumerate(self._all_params())}

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(delta, new state) for one parameter; each optimizer (Apollo, AdamW, SGD) defines its maths here."""
        raise TypeError(f"{type(self).__name__} is a StagedOptimizer without update maths: define _update")

    @torch.no_grad()
    def compute_update(self, p: torch.Tensor, free_grad: bool = False) -> torch.Tensor | None:
        """Delta for one parameter from its current .grad; the new state is staged, not committed."""
        if p.grad is None:
            return None
        if p.grad.is_sparse:
            raise ValueError("sparse gradients are not supported (use dense embeddings)")
        group = self._group_of(p)
        tp = self.tp
        if tp is not None and tp.sharded(p):
            # a tensor-parallel slice: the update of the whole tensor, exactly as on one device (its gradient, and
            # for weight decay the weight, gathered; the state is the whole tensor's), of which this rank keeps its
            # slice
            whole = {**group, "_weight": tp.full(p, p.detach())} if group.get("weight_decay") else group
            delta, new_state = self._update(p, tp.full(p, p.grad), self.state.get(p, {}), whole)
            delta = tp.local(p, delta)
        else:
            delta, new_state = self._update(p, p.grad, self.state.get(p, {}), group)
        self._pending[p] = new_state
        if free_grad:
            p.grad = None
        return delta.to(p.dtype)

    def compute_updates(self, free_grads: bool = False) -> Delta:
        """param -> delta (param dtype, to be ADDED) for every param with a grad. Params stay untouched.
        free_grads drops each .grad once its delta exists, so grads and deltas never both peak."""
        out: Delta = {}
        for p in self._all_params():
            d = self.compute_update(p, free_grad=free_grads)
            if d is not None:
                out[p] = d
        return out

    def commit(self) -> None:
        """Make the staged state (moments, step counts, limiter norms) current: call after a successful apply."""
        for p, st in self._pending.items():
            self.state[p] = st
        self._pending = {}

    def discard(self) -> None:
        """Forget the staged state: the optimizer is as before compute_updates (call after a refused apply)."""
        self._pending = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Classic compute + apply (fp32 add, plain rounding) + commit, for benchmarks and tests."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, d in self.compute_updates().items():
            p.add_(d)
        self.commit()
        return loss

    def attach_per_layer(self, model_or_params: nn.Module | Iterable[torch.Tensor], on_update: OnUpdate) -> Callable[[], None]:
        """Per-layer mode: each param's delta is computed as soon as its grad is accumulated, handed to
        `on_update(param, delta)` (apply now or stage it), and its .grad is freed at once, so at most one
        gradient is alive. Needs one backward per step (no grad accumulation; the norm-growth limiter stands
        in for global-norm clipping, which would need all gradients). Returns a function removing the hooks;
        state is staged as usual: commit() or discard() after the backward."""
        params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
        managed = set(self._index)
        handles = []

        def hook(p: torch.Tensor) -> None:
            delta = self.compute_update(p, free_grad=True)  # freed before the next layer's grad arrives
            if delta is not None:
                on_update(p, delta)

        for p in params:
            if p.requires_grad and p in managed:
                handles.append(p.register_post_accumulate_grad_hook(hook))

        def detach() -> None:
            for h in handles:
                h.remove()

        return detach

    def state_bytes(self) -> int:
        """Bytes held by the committed optimizer state (tensors only)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values() if torch.is_tensor(t))

    # --- checkpoints: tensors + JSON hyper-parameters only, nothing to unpickle ---------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = {self._index[p]: {k: v.clone() for k, v in st.items()} for p, st in self.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [self._index[p] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state does not match these parameters (different groups or sizes)")
        for saved, g in zip(groups, self.param_groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        params = self._all_params()
        self.state.clear()
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            # dtypes kept (fp32 moments stay fp32 for a bf16 param); the step counter stays on the CPU
            self.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in st.items()}
        self._pending = {}

    def save(self, path: str | Path) -> None:
        """Write the state as safetensors (hyper-parameters in the metadata)."""
        from safetensors.torch import save_file

        sd = self.state_dict()
        flat = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        save_file(flat, str(path), metadata={"param_groups": json.dumps(sd["param_groups"]), "class": type(self).__name__})

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open

        state: dict[int, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as f:
            groups = json.loads((f.metadata() or {})["param_groups"])
            for key in f.keys():
                i, k = key.split(".", 1)
                state.setdefault(int(i), {})[k] = f.get_tensor(key)
        self.load_state_dict({"state": state, "param_groups": groups})


def _weight(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The weight an update's maths sees: the whole tensor when `p` is a tensor-parallel slice."""
    return group.get("_weight", p)


def _adam_moments(
    x: torch.Tensor, state: dict[str, torch.Tensor], beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """New (not in-place) first/second moments of x, step count and bias corrections."""
    step = int(state["step"].item()) + 1 if "step" in state else 1
    m = state["exp_avg"] * beta1 + x * (1 - beta1) if "exp_avg" in state else x * (1 - beta1)
    v = state["exp_avg_sq"] * beta2 + x.square() * (1 - beta2) if "exp_avg_sq" in state else x.square() * (1 - beta2)
    return m, v, torch.tensor(step, dtype=torch.int64), 1 - beta1**step, 1 - beta2**step


class AdamW(StagedOptimizer):
    """torch.optim.AdamW's maths written out (fp32 moments), on the staged API."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, grad, state, group):  # type: ignore[no-untyped-def]
        b1, b2 = group["betas"]
        m, v, step, bc1, bc2 = _adam_moments(grad.float(), state, b1, b2)
        upd = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
        delta = -group["lr"] * (upd + group["weight_decay"] * _weight(p, group).float())
        return delta, {"step": step, "exp_avg": m, "exp_avg_sq": v}


class SGD(StagedOptimizer):
    """Plain SGD with optional momentum, on the staged API."""

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, p, grad, state, group):  # type: ignore[no-untyped-def]
        g = grad.float() + group["weight_decay"] * _weight(p, group).float()
        new: dict[str, torch.Tensor] = {}
        if group["momentum"]:
            buf = state["momentum_buffer"] * group["momentum"] + g if "momentum_buffer" in state else g.clone()
            new["momentum_buffer"] = buf
            g = buf
        return -group["lr"] * g, new


class Apollo(StagedOptimizer):
    """APOLLO (channel-wise, rank r) / APOLLO-Mini (Apollo.mini: rank 1, tensor-wise, alpha=sqrt(128))."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 256,
        scale_type: str = "channel",
        proj_gap: int = 200,
        scale: float = 1.0,
        norm_growth_limit: float | None = 1.01,
        seed: int = 0,
    ) -> None:
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
        if rank < 1 or proj_gap < 1:
            raise ValueError(f"rank and proj_gap must be >= 1, got rank={rank}, proj_gap={proj_gap}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, scale_type=scale_type,
                                      proj_gap=proj_gap, scale=scale, norm_growth_limit=norm_growth_limit, seed=seed))

    @classmethod
    def mini(cls, params: Any, lr: float = 1e-3, **kw: Any) -> Apollo:
        kw = {"rank": 1, "scale_type": "tensor", "scale": math.sqrt(128)} | kw
        return cls(params, lr=lr, **kw)

    def _projection(self, p: torch.Tensor, group: dict[str, Any], step: int, r: int, size: int) -> torch.Tensor:
        """Gaussian r x size, N(0, 1/r), regenerated from (seed, param index, interval): never stored."""
        interval = (step - 1) // group["proj_gap"]
        seed = (group["seed"] * 1_000_003 + self._index[p] * _SEED_MIX + interval * 7919) % (2**63 - 1)
        gen = torch.Generator(device=p.device).manual_seed(seed)
        return torch.randn(r, size, generator=gen, device=p.device, dtype=torch.float32) / math.sqrt(r)

    def _update(self, p, grad, state, group):  # type: ignore[no-untyped-def]
        if grad.dim() == 3 and group["rank"] < min(grad.shape[-2:]):
            return self._update_stacked(p, grad, state, group)
        b1, b2 = group["betas"]
        m_, n_ = (grad.shape if grad.dim() == 2 else (0, 0))
        if grad.dim() != 2 or group["rank"] >= min(m_, n_):  # vectors, or no saving: plain AdamW
            m, v, step, bc1, bc2 = _adam_moments(grad.float(), state, b1, b2)
            upd = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
            delta = -group["lr"] * (upd + group["weight_decay"] * _weight(p, group).float())
            return delta, {"step": step, "exp_avg": m, "exp_avg_sq": v}
        step_no = int(state["step"].item()) + 1 if "step" in state else 1
        r = group["rank"]
        left = m_ <= n_  # project the smaller side; channels run along the larger one
        proj = self._projection(p, group, step_no, r, m_ if left else n_).to(grad.dtype)
        low = (proj @ grad if left else grad @ proj.T).float()  # r x n  or  m x r
        m, v, step, bc1, bc2 = _adam_moments(low, state, b1, b2)
        low_upd = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
        tiny = torch.finfo(torch.float32).tiny
        # The full-rank update is alpha * s * G. It is never materialised in fp32: its norm follows from the
        # gradient's (channel) norms, and the delta is one multiply of the gradient by a per-channel factor.
        if group["scale_type"] == "tensor":
            s = low_upd.norm() / (low.norm() + tiny)
            norm = group["scale"] * s * torch.linalg.vector_norm(grad, dtype=torch.float32)
        else:
            dim = 0 if left else 1
            s = low_upd.norm(dim=dim) / (low.norm(dim=dim) + tiny)
            norm = group["scale"] * (s * torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32)).norm()
            s = s.unsqueeze(0) if left else s.unsqueeze(1)
        new = {"step": step, "exp_avg": m, "exp_avg_sq": v, "prev_norm": norm.reshape(1)}
        gamma = group["norm_growth_limit"]
        coef = (-group["lr"] * group["scale"]) * s
        if gamma is not None and "prev_norm" in state:
            # torch.where, not `if`: no host sync per parameter on the GPU
            limit = gamma * state["prev_norm"].reshape(())
            coef = coef * torch.where(norm > limit, limit / norm, torch.ones_like(norm))
            new["prev_norm"] = torch.minimum(norm, limit).reshape(1)
        # one pass in the gradient's dtype: for bf16 the factor's rounding (2^-9) is far below the update's noise
        delta = grad * coef.to(grad.dtype)
        if group["weight_decay"]:
            delta = delta.add(_weight(p, group), alpha=-group["lr"] * group["weight_decay"])
        return delta, new

    def _update_stacked(self, p, grad, state, group):  # type: ignore[no-untyped-def]
        """A 3-D weight is a stack of independent matrices (a mixture's fused experts, E x m x n): each expert gets
        the 2-D maths above with its own low-rank moments (E x r x n), scaling, bias correction and limiter norm,
        so the state stays low-rank instead of AdamW's two fp32 copies of every expert, and nothing of the
        weight's size is held in fp32. One projection per interval serves the whole stack (it is random either
        way). An expert that got no gradient this step (no token was routed to it) is left as it was: zero
        delta, its moments, count and limiter norm kept, as a separate Linear without a gradient would be."""
        b1, b2 = group["betas"]
        e, m_, n_ = grad.shape
        step_no = int(state["step"].item()) + 1 if "step" in state else 1
        r = group["rank"]
        left = m_ <= n_
        proj = self._projection(p, group, step_no, r, m_ if left else n_).to(grad.dtype)
        low = (proj @ grad if left else grad @ proj.T).float()  # E x r x n  or  E x m x r
        if "exp_avg" in state and state["exp_avg"].shape != low.shape:  # full-size AdamW moments: start afresh
            state = {}
        hit = low.flatten(1).abs().amax(1) > 0  # a routed expert's projected gradient is non-zero
        hit3 = hit.view(e, 1, 1)
        zeros = torch.zeros_like(low)
        m_old, v_old = state.get("exp_avg", zeros), state.get("exp_avg_sq", zeros)
        m = torch.where(hit3, m_old * b1 + low * (1 - b1), m_old)
        v = torch.where(hit3, v_old * b2 + low.square() * (1 - b2), v_old)
        hits = state["hits"] + hit if "hits" in state else hit.to(torch.int64)
        t = hits.clamp(min=1).to(torch.float32).view(e, 1, 1)
        low_upd = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
        tiny = torch.finfo(torch.float32).tiny
        if group["scale_type"] == "tensor":
            s = low_upd.norm(dim=(1, 2)) / (low.norm(dim=(1, 2)) + tiny)
            s = torch.where(hit, s, 0.0)  # decayed moments over a zero gradient: the ratio would be inf
            norm = group["scale"] * s * torch.linalg.vector_norm(grad, dim=(1, 2), dtype=torch.float32)
            s = s.view(e, 1, 1)
        else:
            dim = 1 if left else 2
            s = low_upd.norm(dim=dim) / (low.norm(dim=dim) + tiny)
            s = torch.where(hit.view(e, 1), s, 0.0)
            norm = group["scale"] * (s * torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32)).norm(dim=1)
            s = s.unsqueeze(1) if left else s.unsqueeze(2)
        coef = (-group["lr"] * group["scale"]) * s
        prev = state.get("prev_norm")
        new_prev = torch.where(hit, norm, prev) if prev is not None else norm
        gamma = group["norm_growth_limit"]
        if gamma is not None and prev is not None:
            limit = gamma * prev
            capped = hit & (prev > 0) & (norm > limit)  # prev == 0: the expert's first routed step, nothing to compare
            coef = coef * torch.where(capped, limit / norm, 1.0).view(e, 1, 1)
            new_prev = torch.where(capped, limit, new_prev)
        delta = grad * coef.to(grad.dtype)
        if group["weight_decay"]:
            delta = delta.add(p * hit3.to(p.dtype), alpha=-group["lr"] * group["weight_decay"])
        return delta, {"step": torch.tensor(step_no, dtype=torch.int64), "hits": hits, "exp_avg": m, "exp_avg_sq": v,
                       "prev_norm": new_prev}


def make_optimizer(name: str, params: Any, lr: float, **kw: Any) -> StagedOptimizer:
    """"apollo" | "apollo-mini" | "adamw" | "sgd" -> an optimizer with the staged API."""
    if name == "apollo":
        return Apollo(params, lr=lr, **kw)
    if name == "apollo-mini":
        return Apollo.mini(params, lr=lr, **kw)
    if name == "adamw":
        return AdamW(params, lr=lr, **kw)
    if name == "sgd":
        return SGD(params, lr=lr, **kw)
    raise ValueError(f"unknown optimizer {name!r}: use one of apollo, apollo-mini, adamw, sgd")


def moe_routers(model: nn.Module) -> list[str]:
    """Names of the mixture-of-experts routers' weights: a (num_experts, hidden) weight of a module named like a
    router ("gate", "router"), num_experts read from the model's config."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(getattr(config, k, None), int)), None)
    if not experts:
        return []
    hidden = getattr(config, "hidden_size", None)
    return [name for name, p in model.named_parameters()
            if p.dim() == 2 and p.shape[0] == experts and p.shape[1] == hidden
            and name.rsplit(".", 2)[-2] in ("gate", "router")]


def beside_language_model(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of neither the language model (`get_decoder()`) nor the output head: e.g. the vision tower and
    its projector of a released multimodal checkpoint, which the worker keeps frozen."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text = {id(p) for p in decoder.parameters()} | {id(p) for p in (head.parameters() if head is not None else ())}
    return [p for p in model.parameters() if id(p) not in text]


def trainable_parameters(model: nn.Module, train_embeddings: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad (everything except input embeddings / lm_head unless train_embeddings, and the routers of a
    mixture of experts) and return the trainable (name, param) list, each tensor once (tied embeddings are one
    parameter). Routers stay frozen so that training on a handful of preferences does not move which experts
    serve which tokens (vLLM's expert placement and load assume the routing they were sized for). So does
    everything outside the language model and its output head (a multimodal checkpoint's image encoder and
    projector): preferences over text answers give them no gradient to learn from."""
    frozen: set[int] = set(map(id, beside_language_model(model)))
    if not train_embeddings:
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            if mod is not None:
                frozen.update(id(p) for p in mod.parameters())
    frozen.update(id(model.get_parameter(name)) for name in moe_routers(model))
    out: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # named_parameters already de-duplicates tied tensors
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            out.append((name, p))
    return out
