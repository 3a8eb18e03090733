"""DyDiT: timestep-dynamic width (TDW) and spatially dynamic tokens (SDT) on our DiT, PixArt and Latte models
(Zhao et al., "Dynamic Diffusion Transformer", ICLR 2025; DyDiT++, arXiv 2504.06803; spec: /work/shared/specs/dydit.md).

`DyDiT.from_dit(base)` composes with a base model; it never copies it. It holds the model by reference (`self.dit`:
a class `DiT`, a text `PixArtDiT` or a video `LatteDiT`), one `BlockRouters` per routed block (`self.routers`, in
execution order: DiT / PixArt `blocks`; Latte spatial 0, temporal 0, spatial 1, ...), optionally one TD-LoRA
adapter per routed block (`self.lora`, dit/td_lora.py), and runs each block's own modules (`attn.qkv`, `attn.proj`,
`mlp.fc1`, `mlp.fc2`, the norms, the modulation, PixArt's dense `cross_attn`) on a routed path. The base model's
state dict is untouched (`dydit.dit`), so a dense checkpoint loads as before and routers / adapters are new keys.

Code names -> paper symbols (one block, N tokens, width D, H heads, MLP hidden 4D split into H groups of G units):
    t_emb             E_t, the timestep embedding (`time_embed(t)`, without class or text; for flow matching the
                      embedding of t * 1000, as the objective feeds the model)
    head_router       Linear(D -> H-1) on E_t; head 0 always on          -> M_head in {0,1}^H
    channel_router    Linear(D -> H-1) on E_t; group 0 always on         -> M_channel in {0,1}^H (groups of G)
    token_router      Linear(D -> D/16), ReLU, Linear(D/16 -> 1) on the residual stream the MLP reads (after the
                      self-attention update, and for PixArt / Latte spatial blocks after the cross-attention too,
                      so the text is seen: ours) -> M_token per token
    gumbel_sigmoid_gate   hard(sigmoid((logit + g1 - g2) / tau) > 0.5) forward, soft gradient (straight-through)
    block_macs        A (self-attention: qkv, both n^2 products, proj), C (cross-attention, dense, not routed) and M
                      (MLP) MACs of one block from the shapes run
    flops_ratio       r = sum_l [A_l h_l/H + C_l + M_l (g_l/H)(k_l/T)] / sum_l (A_l + C_l + M_l)  per sample
                      (the spec's formula, plus the dense cross-attention term C that TDW does not touch)
    flops_loss        L_F = 2 (mean_batch(r) - lambda)^2

Per family: PixArt's cross-attention stays dense; TDW acts on the self-attention heads and MLP channels, SDT on
the image tokens. Latte: TDW and SDT in the spatial blocks (N tokens per frame) and the temporal blocks (F frames
per patch position); a sample's token mask covers its F*N (frame, patch) tokens.

Modes of `DyDiT.forward`:
    "masked"    the training path: masks multiply the per-head attention output before proj, the fc1 output
                groups and the tokens' MLP updates (Gumbel noise in train(), none in eval()); dense compute.
    "complete"  every gate on (stage 1's second forward); r = 1.
    "sliced"    inference (eval only): TDW masks depend only on t and are shared by the whole batch (cond and
                uncond halves of CFG included). Each block's weights are permuted once (`block_orders`: heads and
                groups by how many timesteps keep them on), so a step's active heads / groups are a prefix and its
                weights are views (`BlockWeights.prefix`), with no copy per step; a mask that is not a prefix of
                its block's order gets one gathered copy per unique (layer, mask). The MLP runs only on the kept
                tokens, gathered over the flattened (B*n, D) batch and written back by index_copy (on CUDA with
                a token capacity: dit/kept_tokens.py's Triton kernels, the scatter in place). TD-LoRA's
                mixture also depends only on t, so each step's adapter update is merged into that step's weights
                (`fold_td_lora`, within a memory budget): no low-rank path runs while sampling.
`set_sampling_grid(timesteps)` evaluates the routers for a whole sampling run at once (one host sync) so that the
steps then need none for the width plan (only the token gather's nonzero remains; `use_token_capacity` removes
that one too: fixed calibrated row counts per block, overflow counted on the device, `token_overflow()`).
Pass a `MacCounter` to count dense and executed MACs from the shapes actually run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention import attention

from .dit import BLOCK_MODULATIONS, DiT, modulate, no_qk_norm
from . import kept_tokens
from .epilogue import can_fuse_weights, linear_gelu_tanh
from .latte import LatteDiT
from .pixart import PixArtDiT, keep_mask
from .td_lora import BlockTDLoRA, low_rank

# Gumbel-sigmoid temperature (DyDiT `dynamic_model.py`).
GATE_TAU = 5.0
# Router bias init: large enough that every gate starts on, so DyDiT starts equal to the dense checkpoint.
WIDTH_ROUTER_BIAS = 15.0
TOKEN_ROUTER_BIAS = 35.0
# The token router's hidden width is D / TOKEN_ROUTER_REDUCTION.
TOKEN_ROUTER_REDUCTION = 16
# Timesteps over which `block_orders` counts how often each head / group is on (DDPM's 0..999 and flow's t*1000).
ORDER_GRID = 1001
BASES = (DiT, PixArtDiT, LatteDiT)
# Most bytes of TD-LoRA-folded weight copies a DyDiT keeps (`DyDiT.fold_td_lora`): one copy of the active weights per
# timestep value. The shipped class DyDiT's 25-step run holds 91 MiB (float32; its weights are 5 MB); DiT-XL/2's would
# need ~1 GB a step, so there only the first steps fold and the rest keep the low-rank path (same outputs either way).
FOLD_BUDGET_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------- gates
def gumbel_sigmoid_gate(logits: Tensor, tau: float = GATE_TAU, noise: bool = True) -> Tensor:
    """Hard {0, 1} gate with a straight-through soft gradient.

    noise=True (training): soft = sigmoid((logits + g1 - g2) / tau), g1, g2 ~ Gumbel(0, 1); forward value
    soft > 0.5. noise=False (eval): sigmoid(logits) > 0.5, with the gradient of sigmoid(logits / tau).
    """
    if noise:
        gumbel = lambda: -torch.empty_like(logits).exponential_().log()  # noqa: E731  -log(Exp(1)) ~ Gumbel(0, 1)
        soft = torch.sigmoid((logits + gumbel() - gumbel()) / tau)
    else:
        soft = torch.sigmoid(logits / tau)
    return _HardStraightThrough.apply(soft)


class _HardStraightThrough(torch.autograd.Function):
    """Forward: exactly 0 or 1 (hard + soft - soft.detach() would leave values like 0.99999994); backward: identity."""

    @staticmethod
    def forward(ctx, soft: Tensor) -> Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class GumbelSigmoidGate(nn.Module):
    """`gumbel_sigmoid_gate` with noise in train() and none in eval()."""

    def __init__(self, tau: float = GATE_TAU):
        super().__init__()
        self.tau = tau

    def forward(self, logits: Tensor) -> Tensor:
        return gumbel_sigmoid_gate(logits, self.tau, noise=self.training)


# ----------------------------------------------------------------------------------------------- FLOPs
def block_macs(seqs: int, tokens: int, width: int, inner: int, kept: int, hidden: int, text_tokens: int = 0
               ) -> tuple[int, int, int]:
    """MACs (A, C, M) of one block run on `seqs` sequences of `tokens` tokens: self-attention at `inner` = active
    heads x head size (qkv, q k^T, attn v, proj), dense cross-attention to `text_tokens` per sequence (q, kv, both
    products, proj; 0 without), and the MLP at `hidden` active units on `kept` tokens (fc1, fc2)."""
    attn = seqs * (3 * tokens * width * inner + 2 * tokens * tokens * inner + tokens * inner * width)
    cross = seqs * (2 * tokens * width * width + 2 * text_tokens * width * width + 2 * tokens * text_tokens * width) \
        if text_tokens else 0
    return attn, cross, 2 * kept * width * hidden


def layer_macs(tokens: int, width: int, mlp_hidden: int) -> tuple[int, int]:
    """Dense MACs of one sample through one DiT block: A (qkv, q k^T, attn v, proj) and M (fc1, fc2)."""
    attn, _, mlp = block_macs(1, tokens, width, width, tokens, mlp_hidden)
    return attn, mlp


def flops_ratio(masks: list[dict[str, Tensor]], attn_macs, mlp_macs, cross_macs=0) -> Tensor:
    """(B,) r = sum_l [A_l h_l/H + C_l + M_l (g_l/H)(k_l/T)] / sum_l (A_l + C_l + M_l); differentiable through
    straight-through masks. A, M, C: per-sample dense MACs, one number for every layer or a sequence per layer."""
    L = len(masks)
    per_layer = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * L  # noqa: E731
    A, M, C = per_layer(attn_macs), per_layer(mlp_macs), per_layer(cross_macs)
    total = 0.0
    for m, a, mm, c in zip(masks, A, M, C):
        heads, groups, tokens = m["head"].mean(1), m["channel"].mean(1), m["token"].mean(1)  # (B,) each
        total = total + a * heads + c + mm * groups * tokens
    return total / (sum(A) + sum(M) + sum(C))


def flops_loss(r_B: Tensor, lam: float | Tensor) -> Tensor:
    """L_F = 2 (mean over the batch of r - lambda)^2: a batch-mean constraint, so routers spread compute over t."""
    return 2 * (r_B.mean() - lam) ** 2


def high_noise_floor_loss(r_B: Tensor, noise_level_B: Tensor, floor: float, from_level: float) -> Tensor:
    """L_floor = 2 relu(floor - r_b)^2 averaged over the samples b with n_b >= from_level (0 when there are none), n_b
    the sample's noise level in [0, 1] (DDPM t/T, flow t). Ours, not the spec's. The batch-mean L_F lets the routers
    put compute where the loss is, and the ε loss at high noise is tiny (an x0 error counts by SNR_t, 0.007 at
    t = 700): the text DyDiT kept 0.31 of the FLOPs at t >= 800 (one head of four, a fifth of the tokens) and 0.79-0.98
    at t <= 222, while the object count, what it loses, is decided at high noise. The floor makes the noisiest steps
    keep at least `floor`; L_F still holds the mean at lambda, so the compute comes from the low-noise steps. (On the
    text DyDiT it moved the compute and cost 1-1.5 points: docs/dydit.md, twenty-first session.)"""
    if not 0 < floor <= 1 or not 0 <= from_level < 1:
        raise ValueError(f"high-noise floor must be in (0, 1] and from_level in [0, 1); got {floor}, {from_level}")
    on = (noise_level_B >= from_level).to(r_B.dtype)
    return 2 * (on * torch.relu(floor - r_B) ** 2).sum() / on.sum().clamp(min=1)


def flops_target(step: int, lam: float, hold: int = 100, reach: int = 1000, start: float = 1.0) -> float:
    """lambda_t: `start` (1, the dense model) for the first `hold` steps, then linear down to `lam` at step `reach`
    (spec section 2); `lam` from step `hold` on when reach <= hold (a continued run, already at lambda: hold = reach
    = 0). A continued run that steps lambda down passes its folder's lambda as `start` (ours: the class model reached
    0.56 that way, 0.7 -> 0.6 -> 0.56)."""
    if step < hold:
        return start
    if reach <= hold:
        return lam
    return max(lam, start - (start - lam) * (step - hold) / max(reach - hold, 1))


@dataclass
class MacCounter:
    """Multiply-accumulates of the routed blocks (self-attention, cross-attention, MLP), summed over forwards:
    `dense` as if every gate were on, `executed` from the shapes actually run; `router` (the routers' linears)
    and `adapter` (TD-LoRA's low-rank paths) are counted apart, as overheads."""

    dense: int = 0
    executed: int = 0
    router: int = 0
    adapter: int = 0

    @property
    def ratio(self) -> float:
        return self.executed / self.dense if self.dense else float("nan")

    @property
    def ratio_with_overheads(self) -> float:
        return (self.executed + self.router + self.adapter) / self.dense if self.dense else float("nan")

    def reset(self) -> None:
        self.dense = self.executed = self.router = self.adapter = 0


# ----------------------------------------------------------------------------------------------- routers
class BlockRouters(nn.Module):
    """TDW head and channel routers (on E_t) and the SDT token router (on the residual stream) of one block."""

    def __init__(self, hidden_size: int, num_heads: int, tau: float = GATE_TAU):
        super().__init__()
        self.head_router = nn.Linear(hidden_size, num_heads - 1)
        self.channel_router = nn.Linear(hidden_size, num_heads - 1)
        hidden = max(hidden_size // TOKEN_ROUTER_REDUCTION, 1)
        self.token_router = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.gate = GumbelSigmoidGate(tau)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Xavier weights; large positive biases so every gate starts on (the model starts equal to the dense one).
        for layer in (self.head_router, self.channel_router, *self.token_router[::2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.head_router.bias, WIDTH_ROUTER_BIAS)
        nn.init.constant_(self.channel_router.bias, WIDTH_ROUTER_BIAS)
        nn.init.constant_(self.token_router[2].bias, TOKEN_ROUTER_BIAS)

    def width_masks(self, t_emb_BD: Tensor, noise: bool) -> tuple[Tensor, Tensor]:
        """(B, H) head mask and (B, H) channel-group mask; index 0 is always on."""
        on = t_emb_BD.new_ones(t_emb_BD.shape[0], 1)
        heads = gumbel_sigmoid_gate(self.head_router(t_emb_BD), self.gate.tau, noise)
        groups = gumbel_sigmoid_gate(self.channel_router(t_emb_BD), self.gate.tau, noise)
        return torch.cat([on, heads], 1), torch.cat([on, groups], 1)

    def token_logits(self, x_BND: Tensor) -> Tensor:
        return self.token_router(x_BND).squeeze(-1)  # (B, N)

    def macs(self, tokens: int, width: int) -> int:
        """Per-sample MACs of the token router (the width routers run once per timestep, not per sample)."""
        return tokens * (width * self.token_router[0].out_features + self.token_router[0].out_features)


# ----------------------------------------------------------------------------------------------- sliced path
def _head_rows(heads, dh: int, width: int, device) -> Tensor:
    """qkv rows of `heads` in head-major order: head h's q rows, then its k rows, then its v rows."""
    h = torch.as_tensor(heads, device=device)[:, None, None]
    s = torch.arange(3, device=device)[None, :, None]
    j = torch.arange(dh, device=device)[None, None, :]
    return (s * width + h * dh + j).flatten()  # (len(heads) * 3 * dh,)


def _units(indices, size: int, device) -> Tensor:
    """Columns of `indices` (heads or groups) each `size` wide, in the given order."""
    return (torch.as_tensor(indices, device=device)[:, None] * size + torch.arange(size, device=device)).flatten()


@dataclass
class BlockWeights:
    """One block's weights for a set of heads and groups, in their order: qkv rows head-major (per head q, k, v),
    proj and fc2 stored transposed (input units as rows), fc1 rows, and TD-LoRA factors sliced the same way (A
    transposed). Built once per block in a permuted order (`gather`), a step's weights are `prefix(ha, ga)`: views,
    no copy. Every sliced tensor is sliced along its rows, so a prefix is contiguous whatever its width: the compiled
    sliced path (`DyDiT.compile_sliced`) sees one stride pattern at every width and never recompiles for it."""

    heads: tuple[int, ...]
    groups: tuple[int, ...]
    head_dim: int
    group_size: int
    qkv_w: Tensor  # (nh * 3 * dh, D)
    qkv_b: Tensor
    proj_wt: Tensor  # (nh * dh, D): proj.weight.T's rows of those heads
    proj_b: Tensor
    fc1_w: Tensor  # (ng * G, D)
    fc1_b: Tensor
    fc2_wt: Tensor  # (ng * G, D): fc2.weight.T's rows of those groups
    fc2_b: Tensor
    lora: dict[str, tuple[Tensor, Tensor]] | None = None  # name -> (A^T (in', K r), B (out', K r))
    fold_macs: int = 0  # MACs spent merging TD-LoRA into these weights (`folded`), 0 when not folded

    @classmethod
    @torch.no_grad()
    def gather(cls, block: nn.Module, lora: BlockTDLoRA | None, heads, groups) -> "BlockWeights":
        qkv, proj, fc1, fc2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
        D, H = proj.in_features, block.attn.num_heads
        dh, G = D // H, fc1.out_features // H
        dev = qkv.weight.device
        rows, cols, units = _head_rows(heads, dh, D, dev), _units(heads, dh, dev), _units(groups, G, dev)
        factors = None
        if lora is not None:
            A, B = {k: a.t() for k, a in lora.A.items()}, lora.B
            factors = {"qkv": (A["qkv"].contiguous(), B["qkv"].index_select(0, rows)),
                       "proj": (A["proj"].index_select(0, cols), B["proj"]),
                       "fc1": (A["fc1"].contiguous(), B["fc1"].index_select(0, units)),
                       "fc2": (A["fc2"].index_select(0, units), B["fc2"])}
            factors = {k: (a.detach(), b.detach()) for k, (a, b) in factors.items()}
        return cls(
            tuple(heads), tuple(groups), dh, G,
            qkv.weight.index_select(0, rows), qkv.bias.index_select(0, rows),
            proj.weight.t().index_select(0, cols), proj.bias,
            fc1.weight.index_select(0, units), fc1.bias.index_select(0, units),
            fc2.weight.t().index_select(0, units), fc2.bias, factors,
        )

    @torch.no_grad()
    def folded(self, w: Tensor) -> "BlockWeights":
        """These weights with the TD-LoRA update of one timestep merged in, `lora` dropped: W + B diag(w) A on each
        of the four linears, w (K·r,) the mixture's column weights (`BlockTDLoRA.column_weights`) at that timestep.
        The mixture depends only on t, like the width masks, so a sampling step's update is one matrix per linear:
        merged once per timestep value, the step runs no low-rank path at all (`DyDiT.fold_td_lora`). Merged in
        float32, rounded once to the weights' dtype."""
        if self.lora is None:
            raise ValueError("these weights carry no TD-LoRA factors to fold")
        (qa, qb), (pa, pb), (f1a, f1b), (f2a, f2b) = (self.lora[k] for k in ("qkv", "proj", "fc1", "fc2"))
        w = w.float()
        # field -> (left, right): the field's rows (out' or in' units) gain (left * w) @ right^T, left (rows, K·r),
        # right (cols, K·r); qkv and fc1 are stored (out', in), proj and fc2 transposed (in', out)
        pairs = {"qkv_w": (qb, qa), "proj_wt": (pa, pb), "fc1_w": (f1b, f1a), "fc2_wt": (f2a, f2b)}
        merged = {name: (getattr(self, name).float() + (left.float() * w) @ right.float().t()).to(
            getattr(self, name).dtype) for name, (left, right) in pairs.items()}
        macs = sum(left.shape[0] * right.shape[0] * w.numel() for left, right in pairs.values())
        return replace(self, **merged, lora=None, fold_macs=macs)

    def nbytes(self) -> int:
        """Bytes of the four weight matrices (what a folded copy adds)."""
        return sum(t.numel() * t.element_size() for t in (self.qkv_w, self.proj_wt, self.fc1_w, self.fc2_wt))

    def prefix(self, heads: int, groups: int) -> "BlockWeights":
        """The first `heads` heads and `groups` groups, as views of these tensors (leading rows: contiguous)."""
        r, c, u = heads * 3 * self.head_dim, heads * self.head_dim, groups * self.group_size
        lora = None
        if self.lora is not None:
            (qa, qb), (pa, pb), (f1a, f1b), (f2a, f2b) = (self.lora[k] for k in ("qkv", "proj", "fc1", "fc2"))
            lora = {"qkv": (qa, qb[:r]), "proj": (pa[:c], pb), "fc1": (f1a, f1b[:u]), "fc2": (f2a[:u], f2b)}
        return replace(self, heads=self.heads[:heads], groups=self.groups[:groups],
                       qkv_w=self.qkv_w[:r], qkv_b=self.qkv_b[:r], proj_wt=self.proj_wt[:c],
                       fc1_w=self.fc1_w[:u], fc1_b=self.fc1_b[:u], fc2_wt=self.fc2_wt[:u], lora=lora)


def kept_index(keep_flat: Tensor, capacity: int, fill: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The positions of the kept tokens, in order, in a fixed number of rows, without asking the GPU how many there
    are (nonzero's host sync). Returns idx (capacity,) — the first `capacity` kept positions, then `fill` for the
    spare rows —, valid (capacity,) which rows are real, and count (a 0-d tensor: how many were kept; more than
    `capacity` means some were left out, which the caller must detect: `DyDiT.token_overflow`).
    torch.nonzero_static pads to a fixed size on the device (its CUDA kernel reads the count on the GPU,
    pytorch/pytorch#136415), one op where a cumsum rank + scatter took a dozen host dispatches per block."""
    idx, count = _kept_rows(keep_flat, capacity, fill)
    return idx, torch.arange(capacity, device=keep_flat.device) < count, count


def _kept_rows(keep_flat: Tensor, capacity: int, fill: int) -> tuple[Tensor, Tensor]:
    """kept_index without the `valid` rows (what the sliced path needs, every block and step)."""
    return torch.nonzero_static(keep_flat, size=capacity, fill_value=fill).squeeze(1), keep_flat.sum()


def token_skip_mlp(
    x_BND: Tensor, keep_BN: Tensor, mlp, norm: nn.Module, shift_BD: Tensor, scale_BD: Tensor, gate_BD: Tensor,
    capacity: int | None = None, padded: Tensor | None = None,
) -> tuple[Tensor, int | Tensor]:
    """x + keep * gate * mlp(modulate(norm(x))) computed on the kept tokens only.

    Flattens to (B*N, D), gathers the K kept tokens (per-sample counts may differ, no padding), indexes the
    per-sample shift/scale/gate by token // N, runs `mlp(h_KD, sample_K)` on the (K, D) kept tokens (sample_K: each
    token's sequence, for per-sequence parameters such as TD-LoRA's mixture) and writes each kept row back whole
    (residual + update) by index_copy: a plain scatter (index_add is an atomic add per element on CUDA, 17% of a
    compiled sliced run at batch 32 on the H100: docs/dydit.md). Returns the new x and K.

    `capacity`: gather into exactly that many rows instead (`kept_index`: no host sync, so the GPU queue never
    drains here). The spare rows point at one scratch row appended after the B*N tokens, so that every real row
    is written once and the spare rows' writes land in the scratch row, which is dropped: the kept tokens' results
    are those of the exact gather. Returns the new x and K as a 0-d tensor (K > capacity: tokens were left out).
    `padded`: that (B*N + 1, D) buffer already made by the caller, with x_BND a view of its first B*N rows (so that
    a compiled caller writes x straight into it instead of copying it there).
    """
    B, N, D = x_BND.shape
    rows = B * N
    x_flat = x_BND.reshape(rows, D)
    if capacity is None:
        idx = keep_BN.reshape(-1).nonzero().squeeze(1)  # (K,)
        count = idx.numel()
    else:
        idx, count = _kept_rows(keep_BN.reshape(-1), capacity, rows)
        # row `rows`: the spare rows' scratch
        x_flat = torch.cat([x_flat, x_flat.new_zeros(1, D)]) if padded is None else padded
    sample = idx // N
    if capacity is not None:
        sample = sample.clamp_max(B - 1)  # the scratch row's sample: any valid one
    x_KD = x_flat.index_select(0, idx)
    # index_select rather than advanced indexing: the same gather with less host work per call.
    h = norm(x_KD) * (1 + scale_BD.index_select(0, sample)) + shift_BD.index_select(0, sample)  # (K, D)
    update = gate_BD.index_select(0, sample) * mlp(h, sample)
    if capacity is None:
        return x_flat.index_copy(0, idx, x_KD + update).view(B, N, D), count
    # In place on the fresh padded copy (no second copy of x); the scratch row is dropped by the slice.
    return x_flat.index_copy_(0, idx, x_KD + update)[:rows].view(B, N, D), count


def sliced_self_attention(x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor, norm_eps: float, qkv_w: Tensor,
                          qkv_b: Tensor, proj_wt: Tensor, proj_b: Tensor,
                          qk: tuple[Tensor, Tensor, float] | None, lora_qkv, lora_proj, lora_w: Tensor | None
                          ) -> Tensor:
    """x + gate * proj(attention of the active heads): the sliced block's attention half, on plain tensors.

    qkv_w (3 * active heads, head_dim, D) holds the active heads' rows head-major (per head q, k, v: `BlockWeights`;
    the head size a dimension of its own, so that compiled it is a constant: `_mark_static_beyond_rows`), proj_wt
    their rows of proj's transposed weight; `qk` is QK-norm's (q scale, k scale, eps) or None; lora_* are sliced
    TD-LoRA factors (A^T, B) with `lora_w` (S, K·r)."""
    S, n, D = x.shape
    ha, head_dim = qkv_w.shape[0] // 3, qkv_w.shape[1]
    qkv_w = qkv_w.reshape(-1, D)
    if kept_tokens.kernels_apply(x, "norm"):  # one Triton pass (dit/kept_tokens.py)
        h = kept_tokens.norm_modulate(x.reshape(S * n, D), shift, scale, n, norm_eps).view(S, n, D)
    else:
        h = modulate(F.layer_norm(x, (D,), eps=norm_eps), shift, scale)
    qkv = F.linear(h, qkv_w, qkv_b)
    if lora_qkv is not None:
        qkv = qkv + low_rank(h, *lora_qkv, lora_w)
    q, k, v = qkv.view(S, n, ha, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)  # (S, ha, n, Dh) each
    if qk is not None:
        q, k = F.rms_norm(q, (head_dim,), qk[0], qk[2]), F.rms_norm(k, (head_dim,), qk[1], qk[2])
    out = attention(q, k, v).transpose(1, 2).reshape(S, n, ha * head_dim)
    attn_out = torch.addmm(proj_b, out.reshape(-1, ha * head_dim), proj_wt).view(S, n, -1)
    if lora_proj is not None:
        attn_out = attn_out + low_rank(out, *lora_proj, lora_w)
    return x + gate[:, None] * attn_out


def sliced_token_mlp(x: Tensor, r1_w: Tensor, r1_b: Tensor, r2_w: Tensor, r2_b: Tensor, shift: Tensor,
                     scale: Tensor, gate: Tensor, norm_eps: float, fc1_w: Tensor, fc1_b: Tensor, fc2_wt: Tensor,
                     fc2_b: Tensor, capacity: int | None, lora_fc1, lora_fc2, lora_w: Tensor | None,
                     overflow: Tensor | None = None) -> tuple[Tensor, int | Tensor, Tensor]:
    """The sliced block's MLP half: the token router's eval decision, then `token_skip_mlp` over the active channel
    groups. r*_w / r*_b: the token router's two linears. Returns (x, kept, keep (S, n) as 0/1 in x's dtype).
    `overflow`: with a capacity, the device counter that a block step whose kept tokens exceed it adds one to (here,
    inside the compiled graph, rather than as separate kernels after it).

    On CUDA with a capacity the gather and the scatter are `dit.kept_tokens`' kernels, and x is updated in place (its
    callers pass a fresh residual stream and keep only the result); elsewhere x is left as it was."""
    S, n, D = x.shape
    padded = None
    kernels = capacity is not None and kept_tokens.kernels_apply(x)
    if capacity is not None and not kernels:
        # The capacity scatter's padded copy of x, made first and read by everything after: compiled, x is then
        # written into it once rather than written, read and copied (a 4% kernel at batch 32 on the H100).
        padded = torch.cat([x.reshape(S * n, D), x.new_zeros(1, D)])
        x = padded[:S * n].view(S, n, D)
    logits = F.linear(F.relu(F.linear(x, r1_w, r1_b)), r2_w, r2_b).squeeze(-1)
    # The eval gate's decision (sigmoid(logits / tau) > 0.5, as gumbel_sigmoid_gate(noise=False)) without its
    # straight-through autograd.Function: nothing is differentiated here, and this runs every block and step.
    keep = torch.sigmoid(logits / GATE_TAU) > 0.5  # (S, n)

    def mlp(h_KD: Tensor, seq_K: Tensor) -> Tensor:
        if lora_fc1 is None and can_fuse_weights(h_KD, fc1_w, fc1_b):  # as the dense MLP: GELU in the epilogue
            return torch.addmm(fc2_b, linear_gelu_tanh(h_KD, fc1_w, fc1_b), fc2_wt)
        a = F.linear(h_KD, fc1_w, fc1_b)
        w_K = None if lora_w is None else lora_w.index_select(0, seq_K)
        if lora_fc1 is not None:
            a = a + low_rank(h_KD, *lora_fc1, w_K)
        a = F.gelu(a, approximate="tanh")
        o = torch.addmm(fc2_b, a, fc2_wt)
        if lora_fc2 is not None:
            o = o + low_rank(a, *lora_fc2, w_K)
        return o

    if kernels:  # the GPU's kept-token kernels (dit/kept_tokens.py): x is updated in place, no padded copy
        x = x.contiguous()  # a no-op for the callers' fresh streams; a view below, so the in-place write is x's
        x_flat = x.view(S * n, D)
        idx, kept = kept_tokens.kept_rows(keep.reshape(-1), capacity, S * n)
        h = kept_tokens.gather_norm_modulate(x_flat, idx, kept, shift, scale, n, norm_eps)
        update = mlp(h, (idx // n).clamp_max(S - 1))
        kept_tokens.scatter_gated_residual_(x_flat, idx, kept, update.contiguous(), gate, n)
    else:
        norm = lambda t: F.layer_norm(t, (D,), eps=norm_eps)  # noqa: E731  (no affine: DiT's norm2)
        x, kept = token_skip_mlp(x, keep, mlp, norm, shift, scale, gate, capacity=capacity, padded=padded)
    if overflow is not None and capacity is not None:
        overflow.add_((kept > capacity).to(overflow.dtype))
    return x, kept, keep.to(x.dtype)


def sliced_block(x: Tensor, attn_args: tuple, mlp_args: tuple) -> tuple[Tensor, int | Tensor, Tensor]:
    """A sliced block without cross-attention as one function: compiled whole, the gated residual after proj is
    fused with what reads it (the token router, the gather) instead of being written and read again."""
    return sliced_token_mlp(sliced_self_attention(x, *attn_args), *mlp_args)


SLICED_EAGER = (sliced_self_attention, sliced_token_mlp, sliced_block)


def _compiled_dynamic(fn, mode: str | None):
    """torch.compile with symbolic leading (row) sizes, every other size static (`_mark_static_beyond_rows`), and
    without duck sizing: otherwise sizes that happen to be equal at the first call (a weight prefix's rows and a chunk's storage offset, both 256) are assumed equal for good, and the
    next width recompiles."""
    from torch.fx.experimental import _config as fx_config

    compiled = torch.compile(fn, dynamic=True, fullgraph=True, mode=mode)

    def call(*args):
        _mark_static_beyond_rows(args)
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)

    return call


def _mark_static_beyond_rows(args) -> None:
    """Only the leading dimension of a sliced-path argument varies between calls: every width prefix is a row slice
    (`BlockWeights`), and x / the modulations lead with the sequence count. The other dimensions (model width D,
    tokens per sequence, LoRA rank) are marked static, so the compiled kernels know them: a LayerNorm over a symbolic
    D loops over its row in blocks of unknown count, and `token // tokens-per-sequence` with a symbolic divisor is a
    64-bit division per element in the gather and scatter kernels."""
    for a in args:
        if isinstance(a, (tuple, list)):
            _mark_static_beyond_rows(a)
        elif isinstance(a, Tensor) and a.ndim > 1:
            torch._dynamo.mark_static(a, list(range(1, a.ndim)))


# ----------------------------------------------------------------------------------------------- model
@dataclass
class DyDiTOutput:
    sample: Tensor  # the base model's output layout
    masks: list[dict[str, Tensor]] = field(default_factory=list)  # per routed block: head (B,H), channel (B,H),
    #                                                               token (B, T): a sample's T tokens in that block
    costs: tuple = ()  # (A, M, C) per block, for flops_ratio

    @property
    def flops_ratio(self) -> Tensor:
        """(B,) r of the formula above, from the masks used. Computed when read: sampling reads only `sample`, and
        forming r is ~30 small ops per forward (0.8 ms of host time per step at 28 blocks under cProfile here)."""
        if not hasattr(self, "_ratio"):
            self._ratio = flops_ratio(self.masks, *self.costs)
        return self._ratio


@dataclass
class _Pass:
    """One forward's state, shared by its blocks."""

    mode: str
    batch: int
    t_emb: Tensor  # E_t (B, D)
    noise: bool
    counter: MacCounter | None
    plan: list[BlockWeights] | None = None  # sliced: this step's weights per routed block
    masks: list[dict[str, Tensor]] = field(default_factory=list)
    costs: list[tuple[int, int, int]] = field(default_factory=list)  # per block: dense (A, C, M) of one sample


def _order(mask_TH: Tensor) -> tuple[int, ...]:
    """Indices by how many rows keep them on, most first (ties by index)."""
    return tuple(torch.argsort(-mask_TH.sum(0), stable=True).tolist())


def _timesteps(timestep, batch: int, device) -> Tensor:
    t = torch.as_tensor(timestep, device=device)
    t_B = t.expand(batch) if t.ndim == 0 else t
    if t_B.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or (batch,) = ({batch},), got {tuple(t_B.shape)}")
    return t_B


class DyDiT(nn.Module):
    """A DiT, PixArtDiT or LatteDiT with TDW and SDT routers (and optionally TD-LoRA); see the module docstring.

    forward(sample, timestep, cond, cond_mask=None, mode=None, counter=None): `cond` is the class ids (DiT) or the
    text encoder states (B, L, E) with `cond_mask` their (B, L) keep mask (PixArt, Latte), as the base forward."""

    def __init__(self, dit: nn.Module, tau: float = GATE_TAU):
        super().__init__()
        if not isinstance(dit, BASES):
            raise ValueError(f"DyDiT routes {', '.join(b.__name__ for b in BASES)}; got {type(dit).__name__}")
        if isinstance(dit, LatteDiT) and dit.config.get("temporal_text_attention", 0):
            # its routed temporal blocks would need the narrow attention in their sliced paths and FLOPs counts
            raise ValueError("DyDiT does not route a LatteDiT with temporal_text_attention (not implemented)")
        self.dit = dit  # by reference: the base model's modules are the ones run
        D, H = dit.config.hidden_size, dit.config.num_heads
        blocks = self.routed_blocks()
        hidden = blocks[0].mlp.fc1.out_features
        if hidden % H:
            raise ValueError(f"MLP hidden {hidden} does not split into {H} groups")
        self.routers = nn.ModuleList(BlockRouters(D, H, tau) for _ in blocks)
        self.lora: nn.ModuleList | None = None
        self._grid: tuple[Tensor, list[list[BlockWeights]]] | None = None
        self._grid_step = 0
        self._sliced_fns = SLICED_EAGER
        self._fold_budget = FOLD_BUDGET_BYTES
        self.clear_cache()

    @classmethod
    def from_dit(cls, dit: nn.Module, tau: float = GATE_TAU) -> "DyDiT":
        return cls(dit, tau)

    def routed_blocks(self) -> list[nn.Module]:
        """The blocks the routers belong to, in execution order (Latte: spatial 0, temporal 0, spatial 1, ...)."""
        if isinstance(self.dit, LatteDiT):
            return [b for pair in zip(self.dit.spatial_blocks, self.dit.temporal_blocks) for b in pair]
        return list(self.dit.blocks)

    def add_td_lora(self, rank: int = 4, experts: int = 4, alpha: float | None = None) -> "DyDiT":
        """Attach one TD-LoRA adapter (dit/td_lora.py) per routed block; zero at init, so outputs are unchanged."""
        blocks = self.routed_blocks()
        ref = blocks[0].mlp.fc1.weight
        self.lora = nn.ModuleList(
            BlockTDLoRA(self.dit.config.hidden_size, blocks[0].mlp.fc1.out_features, rank, experts, alpha)
            for _ in blocks
        ).to(ref.device)
        self.clear_cache()
        return self

    def fold_td_lora(self, max_bytes: int = FOLD_BUDGET_BYTES) -> "DyDiT":
        """Sliced inference merges TD-LoRA into each step's weights (on by default, up to `max_bytes` of copies;
        0 turns it off). The mixture pi(t) depends only on the timestep, so at one step the adapter is one fixed
        low-rank update per linear: merged once per timestep value (`BlockWeights.folded`), the step runs the plain
        sliced matrix products, and the low-rank paths' per-token work (the MacCounter's `adapter` overhead: ~0.07 of
        the dense MACs on the shapes text model) becomes one weight-sized merge per step, whatever the batch. The
        price is memory: a copy of the active weights per timestep value, hence the budget; steps past it keep the
        low-rank path."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._fold_budget = int(max_bytes)
        self._clear_weight_caches()
        return self

    def frozen_backbone(self) -> "DyDiT":
        """Freeze the base model so that only the routers (and TD-LoRA adapters) train."""
        self.dit.requires_grad_(False)
        return self

    # caches hold values derived from the weights; they are rebuilt after any switch of train()/eval().
    def clear_cache(self) -> None:
        self._clear_weight_caches()
        self._kept_frac: dict[int, float] = {}  # most tokens each block kept in exact sliced runs, as a fraction
        self._capacity: tuple[float, int] | None = None  # (margin, multiple) of use_token_capacity
        self._overflow: Tensor | None = None

    def _clear_weight_caches(self) -> None:
        """Drop what holds copies or views of the weights (plans, permuted / sliced weights, masks, the sampling
        grid); the token calibration stays."""
        self._masks_by_t: dict[float, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._steps: dict[float, list[BlockWeights]] = {}
        self._orders: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None
        self._permuted: dict[int, BlockWeights] = {}
        self._sliced: dict[tuple, BlockWeights] = {}  # gathered copies for masks that are not prefixes
        self._mask_cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # sliced blocks' head / group masks
        self._folded_bytes = 0  # held by TD-LoRA-folded step weights (`fold_td_lora`)
        self._grid = None

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() make new weight tensors: cached slices of the old ones would be used silently
        # (a plan made on the CPU ran CPU weights against CUDA activations). Plan again after a move.
        out = super()._apply(fn, recurse)
        self._clear_weight_caches()
        return out

    # ------------------------------------------------------------------------------------------- token capacity
    def use_token_capacity(self, margin: float = 0.1, multiple: int = 64) -> "DyDiT":
        """Sliced inference without host syncs: each block gathers its kept tokens into a fixed number of rows
        (`kept_index`) instead of asking how many there are (`nonzero`, which drains the GPU queue in every block of
        every step: docs/benchmarks.md). The rows: the largest share of tokens the block kept in the exact sliced
        runs so far (so sample once without a capacity first: calibration), times 1 + `margin`, rounded up to
        `multiple`, at most all tokens. Results equal the exact gather's while no block keeps more than its rows;
        `token_overflow()` says whether one did (then its extra tokens skipped the MLP: re-run without capacity)."""
        if not self._kept_frac:
            raise ValueError("no exact sliced run recorded: sample once before use_token_capacity (calibration)")
        if margin < 0 or multiple < 1:
            raise ValueError(f"need margin >= 0 and multiple >= 1, got {margin}, {multiple}")
        self._capacity = (float(margin), int(multiple))
        self._reset_overflow()
        return self

    def compile_sliced(self, mode: str | None = None) -> "DyDiT":
        """Run the sliced path's blocks (`sliced_block`; the halves `sliced_self_attention` and `sliced_token_mlp`
        around a dense cross-attention) through torch.compile, with a token capacity, so that the elementwise work
        around the products is fused (LayerNorm + modulation, bias + gated residual, the router's decision, the
        gather + norm + modulation of the kept tokens) as it is in the compiled dense model.

        Why `dynamic=True`: every step of a sampling run has its own head, group and row counts; with symbolic row
        counts (the other sizes static) one graph per function serves every block and every step (a static compile would recompile per distinct width
        set). The weights are arguments, so nothing is baked in. No CUDA graphs here (mode must not be
        "reduce-overhead" / "max-autotune"): per-step graphs are `dit/step_graphs.py`'s job, and they capture these
        compiled kernels. The exact gather (no capacity) keeps the eager MLP half: its row count is data-dependent."""
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode {mode!r} replays CUDA graphs inside the compiled halves; use dit/step_graphs.py "
                             "for graphs over whole steps")
        self._sliced_fns = tuple(_compiled_dynamic(f, mode) for f in SLICED_EAGER)
        return self

    def eager_sliced(self) -> "DyDiT":
        """Undo `compile_sliced`."""
        self._sliced_fns = SLICED_EAGER
        return self

    @property
    def sliced_compiled(self) -> bool:
        return self._sliced_fns is not SLICED_EAGER

    def exact_token_gather(self) -> "DyDiT":
        """Back to the exact gather (nonzero per block), which also goes on calibrating the capacities."""
        self._capacity = None
        self._reset_overflow()
        return self

    def token_overflow(self) -> int:
        """How many block steps kept more tokens than their capacity since the last call (reads the device: one
        sync); 0 means every result so far equals the exact gather's."""
        n = 0 if self._overflow is None else int(self._overflow)
        self._reset_overflow()
        return n

    # One counter tensor, updated and reset in place, never re-bound: a CUDA graph captured on the capacity path
    # (dit/step_graphs.py) adds into the tensor it saw at capture, so a fresh tensor per forward or per reset would
    # leave token_overflow() reading one that replays never touch.
    def _overflow_counter(self, device: torch.device) -> Tensor:
        if self._overflow is None or self._overflow.device != device:
            self._overflow = torch.zeros((), dtype=torch.int32, device=device)
        return self._overflow

    def _reset_overflow(self) -> None:
        if self._overflow is not None:
            self._overflow.zero_()

    def _capacity_for(self, layer: int, rows: int) -> int | None:
        if self._capacity is None:
            return None
        if layer not in self._kept_frac:
            raise ValueError(f"block {layer} has no calibration (its sliced path never ran without a capacity)")
        margin, multiple = self._capacity
        cap = math.ceil(self._kept_frac[layer] * (1 + margin) * rows / multiple) * multiple
        return min(max(cap, multiple), rows)

    def train(self, mode: bool = True) -> "DyDiT":
        self.clear_cache()
        return super().train(mode)

    @property
    def num_tokens(self) -> int:
        """Tokens per image (per frame for Latte)."""
        return (self.dit.config.sample_size // self.dit.config.patch_size) ** 2

    def dense_layer_macs(self) -> tuple[int, int]:
        """(A, M) of one sample through one image block (self-attention and MLP; cross-attention not included)."""
        return layer_macs(self.num_tokens, self.dit.config.hidden_size, self.routed_blocks()[0].mlp.fc1.out_features)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, sample: Tensor, timestep: Tensor | float | int, cond: Tensor, cond_mask: Tensor | None = None,
                mode: str | None = None, counter: MacCounter | None = None) -> DyDiTOutput:
        mode = mode or ("masked" if self.training else "sliced")
        if mode not in ("masked", "complete", "sliced"):
            raise ValueError(f"unknown mode {mode!r}; valid: masked, complete, sliced")
        if mode == "sliced" and self.training:
            raise ValueError("the sliced path is for inference: call .eval() first")
        if isinstance(self.dit, LatteDiT):
            return self._forward_latte(sample, timestep, cond, cond_mask, mode, counter)
        if isinstance(self.dit, PixArtDiT):
            return self._forward_pixart(sample, timestep, cond, cond_mask, mode, counter)
        return self._forward_dit(sample, timestep, cond, mode, counter)

    def _begin(self, mode: str, t_B: Tensor, t_emb: Tensor, counter: MacCounter | None) -> _Pass:
        ps = _Pass(mode, t_B.shape[0], t_emb, self.training, counter)
        if mode == "sliced":
            ps.plan = self._plan_for(t_B)
        return ps

    @staticmethod
    def _end(sample: Tensor, ps: _Pass) -> DyDiTOutput:
        A, C, M = ([c[i] for c in ps.costs] for i in range(3))
        return DyDiTOutput(sample, ps.masks, (A, M, C))

    def _check_size(self, height: int, width: int) -> None:
        size = self.dit.config.sample_size
        if (height, width) != (size, size):
            raise ValueError(f"sample is {height}x{width}, this {type(self.dit).__name__} takes {size}x{size}")

    def _check_text(self, text: Tensor, batch: int) -> int:
        cfg = self.dit.config
        if not torch.is_tensor(text) or text.ndim != 3 or text.shape[0] != batch \
                or text.shape[2] != cfg.caption_channels:
            got = tuple(text.shape) if torch.is_tensor(text) else type(text).__name__
            raise ValueError(f"cond must be the text states (batch {batch}, tokens, caption_channels "
                             f"{cfg.caption_channels}), got {got}")
        if text.shape[1] > cfg.max_text_tokens:
            raise ValueError(f"{text.shape[1]} text tokens, this model takes at most {cfg.max_text_tokens}")
        return text.shape[1]

    def _forward_dit(self, sample, timestep, class_labels, mode, counter) -> DyDiTOutput:
        dit = self.dit
        B, _, Hs, Ws = sample.shape
        self._check_size(Hs, Ws)
        x = dit.embed(sample)
        t_B = _timesteps(timestep, B, sample.device)
        # DiT.condition returns only t_emb + y_emb; the routers need t_emb alone, so the sum is formed here.
        t_emb = dit.time_embed(t_B)  # E_t: (B, D)
        c = t_emb + dit.label_embed(class_labels)
        ps = self._begin(mode, t_B, t_emb, counter)
        silu_c = F.silu(c)  # once per forward, not per block: 28 fewer kernels a step at XL (it is not compiled here)
        for layer, block in enumerate(dit.blocks):
            mods = block.modulation(silu_c).chunk(BLOCK_MODULATIONS, dim=1)
            x = self._block(layer, block, x, mods, ps)
        return self._end(dit.head(x, c, Hs, Ws), ps)

    def _forward_pixart(self, sample, timestep, text, text_mask, mode, counter) -> DyDiTOutput:
        base = self.dit
        B, _, Hs, Ws = sample.shape
        self._check_size(Hs, Ws)
        L = self._check_text(text, B)
        keep = keep_mask(text_mask, B, L)
        x = base.embed(sample)
        t_B = _timesteps(timestep, B, sample.device)
        t_emb, t6 = base.condition(t_B, B, sample.device)  # E_t (B, D) is adaLN-single's t
        text_BLD = base.embed_text(text, keep)
        ps = self._begin(mode, t_B, t_emb, counter)
        for layer, block in enumerate(base.blocks):
            mods = (block.scale_shift_table[None] + t6).unbind(1)
            cross = lambda x, block=block: x + block.cross_attn(x, text_BLD, keep)  # noqa: E731  dense
            x = self._block(layer, block, x, mods, ps, cross, L)
        return self._end(base.head(x, t_emb, Hs, Ws), ps)

    def _forward_latte(self, sample, timestep, text, text_mask, mode, counter) -> DyDiTOutput:
        base, cfg = self.dit, self.dit.config
        if sample.ndim != 5:
            raise ValueError(f"sample must be (batch, channels, frames, height, width), got {tuple(sample.shape)}")
        B, _, frames, Hs, Ws = sample.shape
        self._check_size(Hs, Ws)
        if frames not in (1, cfg.num_frames):
            raise ValueError(f"sample has {frames} frames, this LatteDiT takes num_frames={cfg.num_frames} or 1")
        L = self._check_text(text, B)
        keep = keep_mask(text_mask, B, L)
        x = base.embed(sample)  # (B·F, N, D)
        N = x.shape[1]
        t_B = _timesteps(timestep, B, sample.device)
        t_emb, t6 = base.condition(t_B, B, sample.device)
        text_BLD = base.embed_text(text, keep)
        text_BF = text_BLD.repeat_interleave(frames, dim=0)  # (B·F, L, D)
        keep_BF = None if keep is None else keep.repeat_interleave(frames, dim=0)
        t6_spatial = t6.repeat_interleave(frames, dim=0)
        t6_temporal = base.temporal_modulation(t6, text_BLD, keep).repeat_interleave(N, dim=0)
        ps = self._begin(mode, t_B, t_emb, counter)
        for i, (spatial, temporal) in enumerate(zip(base.spatial_blocks, base.temporal_blocks)):
            mods = (spatial.scale_shift_table[None] + t6_spatial).unbind(1)
            cross = lambda x, block=spatial: x + block.cross_attn(x, text_BF, keep_BF)  # noqa: E731  dense
            x = self._block(2 * i, spatial, x, mods, ps, cross, L)
            x = base.to_temporal(x, frames)  # (B·N, F, D)
            if i == 0 and frames > 1:
                x = x + base.temporal_pos_embed.to(x.dtype)
            mods = (temporal.scale_shift_table[None] + t6_temporal).unbind(1)
            x = self._block(2 * i + 1, temporal, x, mods, ps)
            x = base.to_spatial(x, N)  # (B·F, N, D)
        return self._end(base.head(x, t_emb, B, Hs, Ws), ps)

    # ------------------------------------------------------------------------------------------- one block
    def _block(self, layer: int, block: nn.Module, x: Tensor, mods, ps: _Pass, cross=None, text_tokens: int = 0
               ) -> Tensor:
        """One routed block on x (S, n, D), S = B x sequences per sample; `cross` is the dense cross-attention
        update (PixArt / Latte spatial blocks), applied after the self-attention update."""
        S, n, D = x.shape
        rep = S // ps.batch
        H, hidden = block.attn.num_heads, block.mlp.fc1.out_features
        router = self.routers[layer]
        lora = None if self.lora is None else self.lora[layer]
        dense = block_macs(rep, n, D, D, rep * n, hidden, text_tokens)  # one sample
        ps.costs.append(dense)
        if ps.mode == "sliced":
            return self._block_sliced(layer, block, x, mods, ps, cross, text_tokens, lora)
        # TD-LoRA's mixture pi(t) per sequence (S, K)
        pi = None if lora is None else lora.mixture(ps.t_emb).repeat_interleave(rep, dim=0)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        if ps.mode == "complete":
            head_m = group_m = x.new_ones(ps.batch, H)
        else:
            head_m, group_m = router.width_masks(ps.t_emb, ps.noise)  # (B, H) each
        head_S, group_S = head_m.repeat_interleave(rep, dim=0), group_m.repeat_interleave(rep, dim=0)
        # attention, all tokens, per-head output masked before proj
        h = modulate(block.norm1(x), shift_a, scale_a)
        qkv = block.attn.qkv(h)
        if lora is not None:
            qkv = qkv + lora.delta(h, lora.A["qkv"], lora.B["qkv"], pi)
        q, k, v = qkv.view(S, n, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (S, H, n, Dh)
        q, k = block.attn.qk_norm(q, k)
        out = (attention(q, k, v) * head_S[:, :, None, None]).transpose(1, 2).reshape(S, n, D)
        attn_out = block.attn.proj(out)
        if lora is not None:
            attn_out = attn_out + lora.delta(out, lora.A["proj"], lora.B["proj"], pi)
        x = x + gate_a[:, None] * attn_out
        if cross is not None:
            x = cross(x)
        # token gate on the residual stream the MLP reads
        if ps.mode == "complete":
            tok_m = x.new_ones(S, n)
        else:
            tok_m = gumbel_sigmoid_gate(router.token_logits(x), router.gate.tau, ps.noise)
        # MLP, hidden groups masked, tokens' updates masked
        h = modulate(block.norm2(x), shift_m, scale_m)
        a = block.mlp.fc1(h)
        if lora is not None:
            a = a + lora.delta(h, lora.A["fc1"], lora.B["fc1"], pi)
        a = F.gelu(a, approximate="tanh") * group_S.repeat_interleave(hidden // H, dim=1)[:, None]  # (S, n, 4D)
        m_out = block.mlp.fc2(a)
        if lora is not None:
            m_out = m_out + lora.delta(a, lora.A["fc2"], lora.B["fc2"], pi)
        x = x + (tok_m[..., None] * gate_m[:, None]) * m_out
        ps.masks.append({"head": head_m, "channel": group_m, "token": tok_m.reshape(ps.batch, -1)})
        if ps.counter is not None:  # the masked path runs every shape densely
            ps.counter.dense += ps.batch * sum(dense)
            ps.counter.executed += ps.batch * sum(dense)
            ps.counter.router += 0 if ps.mode == "complete" else S * router.macs(n, D)
            if lora is not None:
                ps.counter.adapter += _lora_macs(lora, S * n, S * n, D, D, hidden)
        return x

    def _block_sliced(self, layer, block, x, mods, ps: _Pass, cross, text_tokens, lora) -> Tensor:
        S, n, D = x.shape
        H = block.attn.num_heads
        w = ps.plan[layer]
        dh, ha, ga = w.head_dim, len(w.heads), len(w.groups)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        qk = block.attn.qk_norm
        qk = None if qk is no_qk_norm else (qk.q.weight, qk.k.weight, qk.q.eps)
        # TD-LoRA's mixture per sequence, expanded to the K·r factor columns and scaled (the sliced functions take
        # plain tensors, so that one compiled graph serves every block and step); not needed, so not computed, when
        # the adapter is merged into this step's weights (fold_td_lora)
        folded = lora is not None and w.lora is None
        lw = None
        if lora is not None and not folded:
            lw = lora.column_weights(lora.mixture(ps.t_emb).repeat_interleave(S // ps.batch, dim=0))
        f = w.lora or {}
        # contiguous: the patch embedding's output is a transposed view (one stride pattern for the compiled halves)
        attn_args = (shift_a, scale_a, gate_a, block.norm1.eps, w.qkv_w.view(-1, dh, D), w.qkv_b, w.proj_wt,
                     w.proj_b, qk, f.get("qkv"), f.get("proj"), lw)
        rows = S * n
        cap = self._capacity_for(layer, rows)
        tr = self.routers[layer].token_router
        mlp_args = (tr[0].weight, tr[0].bias, tr[2].weight, tr[2].bias, shift_m, scale_m, gate_m, block.norm2.eps,
                    w.fc1_w, w.fc1_b, w.fc2_wt, w.fc2_b, cap, f.get("fc1"), f.get("fc2"), lw,
                    None if cap is None else self._overflow_counter(x.device))
        attn_fn, mlp_fn, block_fn = self._sliced_fns
        if cap is None:  # the exact gather has a data-dependent row count: its MLP half stays eager
            mlp_fn = block_fn = None
        if cross is None and block_fn is not None:  # one graph for the whole block (DiT; Latte's temporal blocks)
            x, kept, keep = block_fn(x.contiguous(), attn_args, mlp_args)
        else:
            x = attn_fn(x.contiguous(), *attn_args)
            if cross is not None:
                x = cross(x)
            x, kept, keep = (mlp_fn or sliced_token_mlp)(x, *mlp_args)
        if cap is None:  # kept is known on the host (nonzero): remember the most this block kept (calibration)
            self._kept_frac[layer] = max(self._kept_frac.get(layer, 0.0), kept / rows)
        else:  # no sync: overflows were counted on the device (sliced_token_mlp), read by token_overflow()
            kept = cap  # the rows the MLP ran on (spare rows included): the executed work
        head_m, group_m = self._unit_masks(layer, w.heads, w.groups, H, ps.batch, x)
        ps.masks.append({"head": head_m, "channel": group_m, "token": keep.reshape(ps.batch, -1)})
        if ps.counter is not None:  # from the shapes run above
            ps.counter.dense += ps.batch * sum(ps.costs[-1])
            ps.counter.executed += sum(block_macs(S, n, D, ha * dh, kept, ga * w.group_size, text_tokens))
            ps.counter.router += S * self.routers[layer].macs(n, D)
            if folded:  # the merge, counted in every forward though it is made once per timestep value and kept
                ps.counter.adapter += w.fold_macs
            elif lora is not None:
                ps.counter.adapter += _lora_macs(lora, S * n, kept, D, ha * dh, ga * w.group_size)
        return x

    def _unit_masks(self, layer: int, heads: tuple[int, ...], groups: tuple[int, ...], H: int, batch: int,
                    like: Tensor) -> tuple[Tensor, Tensor]:
        """The (batch, H) 0/1 head and group masks of a sliced block, built once per plan: building them per call
        (indexing with a host list) was a host-to-device copy in every block of every step."""
        key = (layer, heads, groups, batch, like.device, like.dtype)
        if key not in self._mask_cache:
            head_m, group_m = like.new_zeros(batch, H), like.new_zeros(batch, H)
            head_m[:, list(heads)] = 1
            group_m[:, list(groups)] = 1
            self._mask_cache[key] = (head_m, group_m)
        return self._mask_cache[key]

    # ------------------------------------------------------------------------------------------- inference plans
    @torch.no_grad()
    def _width_masks(self, timesteps: list[float]) -> list[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
        """Active (heads, groups) per block for each timestep value: one router pass, one copy to the host."""
        dev = self.dit.pos_embed.device
        t_emb = self.dit.time_embed(torch.tensor(timesteps, device=dev, dtype=torch.float32))  # (T, D)
        masks = torch.stack([torch.stack(r.width_masks(t_emb, noise=False), 1) for r in self.routers], 1)
        masks = masks.bool().cpu()  # (T, L, 2, H)
        return [[(tuple(m[0].nonzero().flatten().tolist()), tuple(m[1].nonzero().flatten().tolist()))
                 for m in per_t] for per_t in masks]

    def width_plan(self, timestep: float) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Active (head indices, group indices) of every routed block at one timestep value, cached by that value."""
        key = float(timestep)
        if key not in self._masks_by_t:
            self._masks_by_t[key] = self._width_masks([key])[0]
        return self._masks_by_t[key]

    @torch.no_grad()
    def block_orders(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per routed block, heads and groups ordered by how many of ORDER_GRID timesteps in [0, 1000] keep them on
        (most first): the fixed permutation that makes nested masks prefixes."""
        if self._orders is None:
            dev = self.dit.pos_embed.device
            t_emb = self.dit.time_embed(torch.linspace(0, 1000, ORDER_GRID, device=dev))
            self._orders = []
            for router in self.routers:
                head_m, group_m = router.width_masks(t_emb, noise=False)
                self._orders.append((_order(head_m), _order(group_m)))
        return self._orders

    def block_weights(self, layer: int, heads: tuple[int, ...], groups: tuple[int, ...]) -> BlockWeights:
        """Weights of one routed block at one mask: views of the block's permuted copy when the mask is a prefix of
        its order, else a gathered copy cached per unique (layer, mask)."""
        order_h, order_g = self.block_orders()[layer]
        lora = None if self.lora is None else self.lora[layer]
        if set(heads) == set(order_h[:len(heads)]) and set(groups) == set(order_g[:len(groups)]):
            if layer not in self._permuted:
                self._permuted[layer] = BlockWeights.gather(self.routed_blocks()[layer], lora, order_h, order_g)
            return self._permuted[layer].prefix(len(heads), len(groups))
        key = (layer, heads, groups)
        if key not in self._sliced:
            # Its whole prefix: views, like every other step's weights (the compiled sliced path's guards look at
            # a view's base, so a plain tensor here would cost a recompile).
            self._sliced[key] = BlockWeights.gather(self.routed_blocks()[layer], lora, heads, groups).prefix(
                len(heads), len(groups))
        return self._sliced[key]

    def step_weights(self, timestep: float) -> list[BlockWeights]:
        """Every routed block's weights at one timestep value (cached by value)."""
        key = float(timestep)
        if key not in self._steps:
            plan = [self.block_weights(layer, h, g) for layer, (h, g) in enumerate(self.width_plan(key))]
            self._steps[key] = plan if self.lora is None else self._folded_plan(key, plan)
        return self._steps[key]

    @torch.no_grad()
    def _folded_plan(self, timestep: float, plan: list[BlockWeights]) -> list[BlockWeights]:
        """`plan` with TD-LoRA merged at this timestep (`fold_td_lora`), or `plan` itself when over the budget."""
        extra = sum(w.nbytes() for w in plan)
        if self._folded_bytes + extra > self._fold_budget:
            return plan
        self._folded_bytes += extra
        dev = self.dit.pos_embed.device
        t_emb = self.dit.time_embed(torch.tensor([timestep], device=dev, dtype=torch.float32))  # E_t, as forward
        return [w.folded(lora.column_weights(lora.mixture(t_emb))[0]) for w, lora in zip(plan, self.lora)]

    @torch.no_grad()
    def set_sampling_grid(self, timesteps: Tensor) -> None:
        """Plan a sampling run: the width masks and weights of every step, from one router pass. The run's forwards
        then take step i's plan in order, checking t on the device (`torch._assert_async`, no host sync)."""
        values = [float(v) for v in timesteps.detach().float().cpu()]
        missing = [v for v in dict.fromkeys(values) if v not in self._masks_by_t]
        if missing:
            self._masks_by_t.update(zip(missing, self._width_masks(missing)))
        # The grid lives on the model's device whatever the scheduler's (the pipelines' loop keeps the scheduler's
        # timesteps on the CPU): each block compares t with it on the device, and a CPU grid would copy per block.
        device = next(self.parameters()).device
        self._grid = (timesteps.detach().to(device), [self.step_weights(v) for v in values])
        self._grid_step = 0

    def clear_sampling_grid(self) -> None:
        self._grid = None

    def seek_sampling_step(self, step: int) -> None:
        """Make the next forward use step `step` of the sampling grid. Forwards otherwise take the grid's steps in
        call order; per-step CUDA graphs (dit/step_graphs.py) run each step more than once while recording (warm-up,
        then capture), so they put the model at the step first."""
        if self._grid is None:
            raise ValueError("no sampling grid: call set_sampling_grid(timesteps) first")
        steps = len(self._grid[1])
        if not 0 <= step < steps:
            raise ValueError(f"step {step} is outside the sampling grid's {steps} steps")
        self._grid_step = step

    def _plan_for(self, t_B: Tensor) -> list[BlockWeights]:
        if self._grid is not None:
            grid, plans = self._grid
            i = self._grid_step % len(plans)
            self._grid_step += 1
            torch._assert_async((t_B == grid[i].to(t_B.device, t_B.dtype)).all())
            return plans[i]
        if not bool((t_B == t_B[0]).all()):
            raise ValueError("the sliced path shares one TDW mask per batch: every sample needs the same timestep")
        return self.step_weights(float(t_B[0]))


def _lora_macs(lora: BlockTDLoRA, tokens: int, kept: int, width: int, inner: int, hidden: int) -> int:
    """MACs of TD-LoRA's low-rank paths: qkv and proj on `tokens`, fc1 and fc2 on `kept`, at the active sizes."""
    kr = lora.experts * lora.rank
    return tokens * kr * (width + 3 * inner + inner + width) + kept * kr * (width + hidden + hidden + width)


def add_dydit(dit: nn.Module, tau: float = GATE_TAU) -> DyDiT:
    """The DyDiT that routes `dit` (same as `DyDiT.from_dit`)."""
    return DyDiT.from_dit(dit, tau)


class DyDiTTransformer(nn.Module):
    """A DyDiT as the `transformer` of our pipelines (ClassToImagePipeline, TextToImagePipeline,
    TextToVideoPipeline): forward(sample, timestep, cond, cond_mask=None) -> the output tensor, on the sliced path,
    every forward's MACs added to `counter`. `config`, `dtype` and `null_class_id` are the base model's.

    `attach(pipe)`: each sampling run's width plan is then computed once from `pipe.scheduler.timesteps` (when that
    tensor changes, i.e. at every `set_timesteps`), so the steps need no host sync for it."""

    def __init__(self, dydit: DyDiT):
        super().__init__()
        self.dydit = dydit
        self.counter = MacCounter()
        self._pipe = None
        self._grid_of: Tensor | None = None

    @property
    def config(self):
        return self.dydit.dit.config

    @property
    def base_model(self) -> nn.Module:
        return self.dydit.dit

    @property
    def dtype(self) -> torch.dtype:
        return self.dydit.dit.dtype

    @property
    def device(self) -> torch.device:
        return self.dydit.dit.device

    @property
    def null_class_id(self) -> int:
        return self.dydit.dit.null_class_id

    def attach(self, pipe) -> "DyDiTTransformer":
        import weakref

        self._pipe = weakref.ref(pipe)
        self._grid_of = None
        return self

    def train(self, mode: bool = True) -> "DyDiTTransformer":
        self._grid_of = None
        return super().train(mode)

    def forward(self, sample: Tensor, timestep, cond, cond_mask: Tensor | None = None) -> Tensor:
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is not None:
            timesteps = pipe.scheduler.timesteps
            if timesteps is not self._grid_of:
                self.dydit.set_sampling_grid(timesteps)
                self._grid_of = timesteps
        return self.dydit(sample, timestep, cond, cond_mask, mode="sliced", counter=self.counter).sample
