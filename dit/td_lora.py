"""TD-LoRA: timestep-dependent LoRA (DyDiT++, Zhao et al. 2025, arXiv 2504.06803; spec: /work/shared/specs/dydit.md
section 2, the mixing rule is ours and unverified against the paper).

Per routed block, K rank-r LoRA experts on each of the four linears the width routers slice (`attn.qkv`,
`attn.proj`, `mlp.fc1`, `mlp.fc2`), mixed per sample by softmax(Linear(E_t)), so the update depends on the timestep:

    W x  ->  W x + (alpha / r) * sum_k pi_k(t) B_k A_k x,    pi(t) = softmax(mixer(E_t))

`BlockTDLoRA` holds the factors stacked over the experts, A (K·r, in) and B (out, K·r); `delta` runs the low-rank
path on (..., in) inputs with a per-sequence mixture. B starts at zero (so the adapter is exactly zero at init and the
model equals its base), A is Kaiming-uniform as in LoRA, the mixer starts at zero (uniform mixture).

At inference every sample of a step shares t, so the mixed update is one matrix per linear: DyDiT's sliced path
merges it into that step's sliced weights once per timestep value (`BlockWeights.folded`, `DyDiT.fold_td_lora`)
instead of running `low_rank` on every token.

Code names -> symbols: `experts` K, `rank` r, `alpha` alpha, `mixer` the Linear on E_t, `pi` pi(t) (B, K),
`A` / `B` the stacked A_k / B_k.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# The four linears of a block the adapter adapts (the ones TDW slices), with their (in, out) as multiples of D.
TARGETS = ("qkv", "proj", "fc1", "fc2")


def target_shapes(width: int, mlp_hidden: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target linear of a block of width D and MLP hidden 4D."""
    return {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, mlp_hidden), "fc2": (mlp_hidden, width)}


def low_rank(x: Tensor, At: Tensor, B: Tensor, w: Tensor) -> Tensor:
    """((x A^T) * w) B^T: the mixed low-rank update, given A^T (in, K·r) and w (S, K·r) per sequence of x (S, ..., in)
    or (M, K·r) per row of x (M, in), already scaled (`BlockTDLoRA.column_weights`). On plain tensors, so DyDiT's
    compiled sliced path (dit/dydit.py) calls it with its pre-transposed, sliced factors."""
    h = x @ At  # (..., K·r)
    return (h * w.view(w.shape[0], *([1] * (h.ndim - 2)), w.shape[-1])) @ B.t()


class BlockTDLoRA(nn.Module):
    """K rank-r experts on qkv/proj/fc1/fc2 of one block, and the mixer on E_t."""

    def __init__(self, width: int, mlp_hidden: int, rank: int = 4, experts: int = 4, alpha: float | None = None):
        super().__init__()
        if rank < 1 or experts < 1:
            raise ValueError(f"TD-LoRA needs rank >= 1 and experts >= 1, got rank={rank}, experts={experts}")
        self.rank, self.experts = rank, experts
        self.scale = (alpha if alpha is not None else rank) / rank
        self.mixer = nn.Linear(width, experts)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, (fan_in, fan_out) in target_shapes(width, mlp_hidden).items():
            self.A[name] = nn.Parameter(torch.empty(experts * rank, fan_in))
            self.B[name] = nn.Parameter(torch.empty(fan_out, experts * rank))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # A: LoRA's Kaiming-uniform; B: zero, so the update is exactly 0 and the model starts equal to its base.
        for name in TARGETS:
            nn.init.kaiming_uniform_(self.A[name], a=math.sqrt(5))
            nn.init.zeros_(self.B[name])
        # Mixer zero: pi = 1/K for every t at the start.
        nn.init.zeros_(self.mixer.weight)
        nn.init.zeros_(self.mixer.bias)

    def mixture(self, t_emb_BD: Tensor) -> Tensor:
        """pi(t): (B, K) softmax weights of the experts."""
        return torch.softmax(self.mixer(t_emb_BD), dim=-1)

    def delta(self, x: Tensor, A: Tensor, B: Tensor, pi_SK: Tensor) -> Tensor:
        """(alpha/r) sum_k pi_k B_k A_k x for x (S, ..., in) with one mixture per sequence (S, K), or for x (M, in)
        with one mixture per row (M, K). A (K·r, in') and B (out', K·r) may be slices of the stored factors."""
        return low_rank(x, A.t(), B, self.column_weights(pi_SK))

    def column_weights(self, pi_SK: Tensor) -> Tensor:
        """The mixture expanded to the K·r factor columns and scaled: (S, K·r), what `low_rank` takes."""
        return pi_SK.repeat_interleave(self.rank, dim=-1) * self.scale

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
