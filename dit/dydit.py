"""DyDiT: timestep-dynamic width (TDW) and spatially dynamic tokens (SDT) on our DiT (Zhao et al., "Dynamic
Diffusion Transformer", ICLR 2025; spec: /work/shared/specs/dydit.md).

`DyDiT.from_dit(dit)` composes with a DiT; it never copies it. It holds the DiT by reference (`self.dit`) and one
`BlockRouters` per block (`self.routers`), and runs each block's own modules (`modulation`, `norm1`, `attn.qkv`,
`attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) on a routed path. The DiT's state dict is untouched (`dydit.dit`), so
a dense checkpoint loads as before and the routers are new keys.

Code names -> paper symbols (one block, N tokens, width D, H heads, MLP hidden 4D split into H groups of G units):
    t_emb             E_t, the timestep embedding (`dit.time_embed(t)`, without the class embedding)
    head_router       Linear(D -> H-1) on E_t; head 0 always on          -> M_head in {0,1}^H
    channel_router    Linear(D -> H-1) on E_t; group 0 always on         -> M_channel in {0,1}^H (groups of G)
    token_router      Linear(D -> D/16), ReLU, Linear(D/16 -> 1) on x after the attention update -> M_token (B, N)
    gumbel_sigmoid_gate   hard(sigmoid((logit + g1 - g2) / tau) > 0.5) forward, soft gradient (straight-through)
    layer_macs        A (attention: qkv, both N^2 products, proj) and M (MLP) dense MACs of one layer
    flops_ratio       r = sum_l [A h_l/H + M (g_l/H)(k_l/N)] / (L (A + M))  per sample
    flops_loss        L_F = 2 (mean_batch(r) - lambda)^2

Modes of `DyDiT.forward`:
    "masked"    the training path: masks multiply the per-head attention output before proj, the fc1 output
                groups and the tokens' MLP updates (Gumbel noise in train(), none in eval()); dense compute.
    "complete"  every gate on (stage 1's second forward); r = 1.
    "sliced"    inference (eval only): TDW masks precomputed per timestep value and shared by the whole batch
                (cond and uncond halves of CFG included); qkv rows / proj columns of the active heads and fc1 rows /
                fc2 columns of the active groups are sliced out and cached per unique (layer, mask); the MLP runs
                only on the kept tokens, gathered over the flattened (B*N, D) batch and put back by index_add.
Pass a `MacCounter` to count dense and executed MACs of the attention and MLP from the shapes actually run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention import attention

from .dit import BLOCK_MODULATIONS, DiT, DiTBlock, modulate

# Gumbel-sigmoid temperature (DyDiT `dynamic_model.py`).
GATE_TAU = 5.0
# Router bias init: large enough that every gate starts on, so DyDiT starts equal to the dense checkpoint.
WIDTH_ROUTER_BIAS = 15.0
TOKEN_ROUTER_BIAS = 35.0
# The token router's hidden width is D / TOKEN_ROUTER_REDUCTION.
TOKEN_ROUTER_REDUCTION = 16


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
def layer_macs(tokens: int, width: int, mlp_hidden: int) -> tuple[int, int]:
    """Dense MACs of one sample through one block: A (qkv, q k^T, attn v, proj) and M (fc1, fc2)."""
    attn = 3 * tokens * width * width + 2 * tokens * tokens * width + tokens * width * width
    mlp = 2 * tokens * width * mlp_hidden
    return attn, mlp


def flops_ratio(masks: list[dict[str, Tensor]], attn_macs: int, mlp_macs: int) -> Tensor:
    """(B,) r = sum_l [A h_l/H + M (g_l/H)(k_l/N)] / (L (A + M)); differentiable through straight-through masks."""
    total = 0.0
    for m in masks:
        heads, groups, tokens = m["head"].mean(1), m["channel"].mean(1), m["token"].mean(1)  # (B,) each
        total = total + attn_macs * heads + mlp_macs * groups * tokens
    return total / (len(masks) * (attn_macs + mlp_macs))


def flops_loss(r_B: Tensor, lam: float | Tensor) -> Tensor:
    """L_F = 2 (mean over the batch of r - lambda)^2: a batch-mean constraint, so routers spread compute over t."""
    return 2 * (r_B.mean() - lam) ** 2


def flops_target(step: int, lam: float, hold: int = 100, reach: int = 1000) -> float:
    """lambda_t: 1 for the first `hold` steps, then linear down to `lam` at step `reach` (spec section 2)."""
    if step < hold:
        return 1.0
    return max(lam, 1.0 - (1.0 - lam) * (step - hold) / max(reach - hold, 1))


@dataclass
class MacCounter:
    """Multiply-accumulates of the blocks' attention and MLP, summed over forwards: `dense` as if every gate were
    on, `executed` from the shapes actually run; `router` counts the routers' own linears separately."""

    dense: int = 0
    executed: int = 0
    router: int = 0

    @property
    def ratio(self) -> float:
        return self.executed / self.dense if self.dense else float("nan")

    def reset(self) -> None:
        self.dense = self.executed = self.router = 0


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
@dataclass
class SlicedBlock:
    """One block's weights at one TDW mask: the active heads' qkv rows and proj columns, the active groups' fc1 rows
    and fc2 columns. `heads`/`groups` are the active indices."""

    heads: tuple[int, ...]
    groups: tuple[int, ...]
    qkv_w: Tensor
    qkv_b: Tensor
    proj_w: Tensor
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor

    @classmethod
    def from_block(cls, block: DiTBlock, heads: tuple[int, ...], groups: tuple[int, ...]) -> "SlicedBlock":
        qkv, proj, fc1, fc2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
        D, H = proj.in_features, block.attn.num_heads
        dh, G = D // H, fc1.out_features // H
        dev = qkv.weight.device
        head_cols = (torch.tensor(heads, device=dev)[:, None] * dh + torch.arange(dh, device=dev)).flatten()
        qkv_rows = torch.cat([s * D + head_cols for s in range(3)])  # q, k, v rows of the active heads
        unit = (torch.tensor(groups, device=dev)[:, None] * G + torch.arange(G, device=dev)).flatten()
        return cls(
            heads, groups,
            qkv.weight.index_select(0, qkv_rows), qkv.bias.index_select(0, qkv_rows),
            proj.weight.index_select(1, head_cols),
            fc1.weight.index_select(0, unit), fc1.bias.index_select(0, unit),
            fc2.weight.index_select(1, unit),
        )


def token_skip_mlp(
    x_BND: Tensor, keep_BN: Tensor, mlp, norm: nn.Module, shift_BD: Tensor, scale_BD: Tensor, gate_BD: Tensor
) -> tuple[Tensor, int]:
    """x + keep * gate * mlp(modulate(norm(x))) computed on the kept tokens only.

    Flattens to (B*N, D), gathers the K kept tokens (per-sample counts may differ, no padding), indexes the
    per-sample shift/scale/gate by token // N, runs `mlp` on (K, D) and index_adds the update back.
    Returns the new x and K.
    """
    B, N, D = x_BND.shape
    x_flat = x_BND.reshape(B * N, D)
    idx = keep_BN.reshape(-1).nonzero().squeeze(1)  # (K,)
    sample = idx // N
    h = norm(x_flat.index_select(0, idx)) * (1 + scale_BD[sample]) + shift_BD[sample]  # (K, D)
    update = gate_BD[sample] * mlp(h)
    return x_flat.index_add(0, idx, update).view(B, N, D), idx.numel()


# ----------------------------------------------------------------------------------------------- model
@dataclass
class DyDiTOutput:
    sample: Tensor  # (B, C_out, H, W)
    flops_ratio: Tensor  # (B,) r of the spec formula from the masks used
    masks: list[dict[str, Tensor]] = field(default_factory=list)  # per block: head (B,H), channel (B,H), token (B,N)


class DyDiT(nn.Module):
    """A DiT with TDW and SDT routers; see the module docstring for the modes and symbols."""

    def __init__(self, dit: DiT, tau: float = GATE_TAU):
        super().__init__()
        self.dit = dit  # by reference: the dense model's modules are the ones run
        D, H = dit.config.hidden_size, dit.config.num_heads
        if dit.blocks[0].mlp.fc1.out_features % H:
            raise ValueError(f"MLP hidden {dit.blocks[0].mlp.fc1.out_features} does not split into {H} groups")
        self.routers = nn.ModuleList(BlockRouters(D, H, tau) for _ in dit.blocks)
        self._masks_by_t: dict[tuple, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._sliced: dict[tuple, SlicedBlock] = {}

    @classmethod
    def from_dit(cls, dit: DiT, tau: float = GATE_TAU) -> "DyDiT":
        return cls(dit, tau)

    # caches hold values derived from the weights; they are rebuilt after any switch of train()/eval().
    def clear_cache(self) -> None:
        self._masks_by_t.clear()
        self._sliced.clear()

    def train(self, mode: bool = True) -> "DyDiT":
        self.clear_cache()
        return super().train(mode)

    @property
    def num_tokens(self) -> int:
        return (self.dit.config.sample_size // self.dit.config.patch_size) ** 2

    def dense_layer_macs(self) -> tuple[int, int]:
        return layer_macs(self.num_tokens, self.dit.config.hidden_size, self.dit.blocks[0].mlp.fc1.out_features)

    def frozen_backbone(self) -> "DyDiT":
        """Freeze the DiT so that only the routers train (TD-LoRA-style PEFT, or router-only tests)."""
        self.dit.requires_grad_(False)
        return self

    # --- forward
    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        class_labels: Tensor,
        mode: str | None = None,
        counter: MacCounter | None = None,
    ) -> DyDiTOutput:
        mode = mode or ("masked" if self.training else "sliced")
        if mode not in ("masked", "complete", "sliced"):
            raise ValueError(f"unknown mode {mode!r}; valid: masked, complete, sliced")
        if mode == "sliced" and self.training:
            raise ValueError("the sliced path is for inference: call .eval() first")
        dit = self.dit
        B, C, Hs, Ws = sample.shape
        if (Hs, Ws) != (dit.config.sample_size,) * 2:
            raise ValueError(f"sample is {Hs}x{Ws}, this DiT takes {dit.config.sample_size}x{dit.config.sample_size}")
        x = dit.embed(sample)
        # DiT.condition returns only t_emb + y_emb; the routers need t_emb alone, so the sum is formed here
        # (the same two modules, once each).
        t = torch.as_tensor(timestep, device=class_labels.device)
        t_B = t.expand(B) if t.ndim == 0 else t
        t_emb = dit.time_embed(t_B)  # E_t: (B, D)
        c = t_emb + dit.label_embed(class_labels)
        A, M = self.dense_layer_macs()
        if mode == "sliced":
            x, masks = self._forward_sliced(x, c, t_B, counter)
        else:
            x, masks = self._forward_masked(x, c, t_emb, complete=mode == "complete", counter=counter)
        return DyDiTOutput(dit.head(x, c, Hs, Ws), flops_ratio(masks, A, M), masks)

    def _forward_masked(self, x: Tensor, c: Tensor, t_emb: Tensor, complete: bool, counter: MacCounter | None):
        B, N, D = x.shape
        noise = self.training
        masks = []
        for block, router in zip(self.dit.blocks, self.routers):
            H = block.attn.num_heads
            if complete:
                head_m = x.new_ones(B, H)
                group_m = x.new_ones(B, H)
            else:
                head_m, group_m = router.width_masks(t_emb, noise)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulation(F.silu(c)).chunk(
                BLOCK_MODULATIONS, dim=1
            )
            # attention, all tokens, per-head output masked before proj
            h = modulate(block.norm1(x), shift_a, scale_a)
            q, k, v = block.attn.qkv(h).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
            out = attention(q, k, v) * head_m[:, :, None, None]
            x = x + gate_a[:, None] * block.attn.proj(out.transpose(1, 2).reshape(B, N, D))
            # token gate on the residual stream after the attention update
            if complete:
                tok_m = x.new_ones(B, N)
            else:
                tok_m = gumbel_sigmoid_gate(router.token_logits(x), router.gate.tau, noise)
            # MLP, hidden groups masked, tokens' updates masked
            h = modulate(block.norm2(x), shift_m, scale_m)
            a = F.gelu(block.mlp.fc1(h), approximate="tanh")  # (B, N, 4D)
            a = a * group_m.repeat_interleave(a.shape[-1] // H, dim=1)[:, None]
            x = x + (tok_m[..., None] * gate_m[:, None]) * block.mlp.fc2(a)
            masks.append({"head": head_m, "channel": group_m, "token": tok_m})
            if counter is not None:  # the masked path runs every shape densely
                A, M = self.dense_layer_macs()
                counter.dense += B * (A + M)
                counter.executed += B * (A + M)
                counter.router += 0 if complete else B * router.macs(N, D)
        return x, masks

    # --- inference: precomputed TDW masks, sliced weights, gathered tokens
    @torch.no_grad()
    def width_plan(self, timestep: float, device=None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Active (head indices, group indices) of every block at one timestep value, cached by that value."""
        dev = device or self.dit.pos_embed.device
        key = (float(timestep), str(dev))
        if key not in self._masks_by_t:
            t_emb = self.dit.time_embed(torch.tensor([float(timestep)], device=dev))  # (1, D)
            plan = []
            for router in self.routers:
                head_m, group_m = router.width_masks(t_emb, noise=False)
                plan.append((tuple(head_m[0].nonzero().flatten().tolist()),
                             tuple(group_m[0].nonzero().flatten().tolist())))
            self._masks_by_t[key] = plan
        return self._masks_by_t[key]

    def sliced_block(self, layer: int, heads: tuple[int, ...], groups: tuple[int, ...]) -> SlicedBlock:
        """Sliced weights, cached per unique (layer, mask), so identical masks at different steps share them."""
        key = (layer, heads, groups)
        if key not in self._sliced:
            with torch.no_grad():
                self._sliced[key] = SlicedBlock.from_block(self.dit.blocks[layer], heads, groups)
        return self._sliced[key]

    def _forward_sliced(self, x: Tensor, c: Tensor, t_B: Tensor, counter: MacCounter | None):
        if not bool((t_B == t_B[0]).all()):
            raise ValueError("the sliced path shares one TDW mask per batch: every sample needs the same timestep")
        B, N, D = x.shape
        plan = self.width_plan(float(t_B[0]), x.device)
        A, M = self.dense_layer_macs()
        masks = []
        for layer, (block, router, (heads, groups)) in enumerate(zip(self.dit.blocks, self.routers, plan)):
            H = block.attn.num_heads
            dh, G = D // H, block.mlp.fc1.out_features // H
            w = self.sliced_block(layer, heads, groups)
            ha, ga = len(heads), len(groups)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.modulation(F.silu(c)).chunk(
                BLOCK_MODULATIONS, dim=1
            )
            h = modulate(block.norm1(x), shift_a, scale_a)
            q, k, v = F.linear(h, w.qkv_w, w.qkv_b).view(B, N, 3, ha, dh).permute(2, 0, 3, 1, 4).unbind(0)
            out = attention(q, k, v)  # (B, ha, N, Dh)
            attn_out = F.linear(out.transpose(1, 2).reshape(B, N, ha * dh), w.proj_w, block.attn.proj.bias)
            x = x + gate_a[:, None] * attn_out
            keep = torch.sigmoid(router.token_logits(x)) > 0.5  # (B, N)
            mlp = lambda h_KD: F.linear(  # noqa: E731
                F.gelu(F.linear(h_KD, w.fc1_w, w.fc1_b), approximate="tanh"), w.fc2_w, block.mlp.fc2.bias
            )
            x, kept = token_skip_mlp(x, keep, mlp, block.norm2, shift_m, scale_m, gate_m)
            head_m = x.new_zeros(B, H)
            head_m[:, list(heads)] = 1
            group_m = x.new_zeros(B, H)
            group_m[:, list(groups)] = 1
            masks.append({"head": head_m, "channel": group_m, "token": keep.to(x.dtype)})
            if counter is not None:  # from the shapes run above
                counter.dense += B * (A + M)
                counter.executed += (
                    B * N * D * 3 * ha * dh  # qkv
                    + 2 * B * ha * N * N * dh  # q k^T, attn v
                    + B * N * ha * dh * D  # proj
                    + kept * D * ga * G * 2  # fc1, fc2 on the kept tokens
                )
                counter.router += B * router.macs(N, D)
        return x, masks


def add_dydit(dit: DiT, tau: float = GATE_TAU) -> DyDiT:
    """The DyDiT that routes `dit` (same as `DyDiT.from_dit`)."""
    return DyDiT.from_dit(dit, tau)
