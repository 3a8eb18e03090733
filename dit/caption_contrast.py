"""Counterfactual-caption contrast: a training term that makes a text-conditioned denoiser read the words that tell
two otherwise equal videos apart (ours; issue 5).

Why. The shapes video model never learned its motion words (bench/t2v_motion_probe.py, docs/dit.md): swapping
"left" and "right" in the caption changes its loss by under 0.1% and its output 5-32 times less than changing the
colour, over seven runs with other loss weightings, prediction types and conditioning paths. In the denoising loss
the motion is a small share of the error: where the noisy input still shows the object (low noise) the model can copy
its motion from the frames, and where it cannot (high noise) the error is dominated by what no caption says (the
start position, the noise). So the gradient that would teach the words is a small, noisy part of the whole.

What. Each training item's noisy input x_t is denoised twice: under its caption c and under a counterfactual caption
c' that states other motions for the same objects (`shapes.text.counterfactual_scene`: left <-> right, up <-> down,
grow <-> shrink, ...). With e(c) the per-sample prediction error of the objective (the ε or v or velocity MSE) and
w_t its sample weight (P2's, or 1), the term is

    L_contrast = mean over rows of  w_t · relu(e(c) - e(c') + m · sg(e(c)))

on the rows whose noise level t / T is at least `noise_from` (where the motion is decided; below it the frames show
the motion) and whose caption was not dropped to the empty prompt; the others count zero. It asks that the true
caption explain the video better than the counterfactual by a margin of m (relative to the true error); met, it is
zero. Its gradient is the plain loss's, once toward the target under c and once away from it under c', so λ = 1 adds
as much gradient as the loss itself. It is in the family of contrastive objectives for diffusion (contrastive flow
matching, Stoica et al. 2025, pushes a prediction away from other samples' targets; a diffusion model as a classifier
of its prompts, Li et al. 2023, compares exactly these errors) with the negative made here: the same video, only the
words that matter changed, which the procedural world can write exactly.

Cost: the model runs on 2B rows (one batched forward), so a step costs about twice as much.
"""
from __future__ import annotations

import torch
from torch import Tensor


def contrast_loss(err_true: Tensor, err_counter: Tensor, weight: Tensor, active: Tensor, margin: float) -> Tensor:
    """Mean over the batch of weight · relu(err_true - err_counter + margin · sg(err_true)) on the active rows
    (all (B,))."""
    hinge = torch.relu(err_true - err_counter + margin * err_true.detach())
    return (weight * hinge * active.to(hinge.dtype)).mean()


def relative_gap(err_true: Tensor, err_counter: Tensor, active: Tensor) -> Tensor:
    """mean over the active rows of (e(c') - e(c)) / e(c): how much worse the counterfactual caption explains the
    video (0 for a model that does not read the words that differ); 0 when no row is active."""
    gap = (err_counter - err_true) / err_true.clamp(min=1e-12)
    a = active.to(gap.dtype)
    return (gap * a).sum() / a.sum().clamp(min=1)


def _stack_text(cond, counter):
    """Text conditions (tokens (B, L, E), keep (B, L)) of the two captions stacked into 2B rows; both come from one
    tokenizer padded to its context length, so their shapes agree."""
    (tok, keep), (tok2, keep2) = cond, counter
    if tok.shape != tok2.shape:
        raise ValueError(f"caption and counterfactual tokens differ in shape: {tuple(tok.shape)} vs "
                         f"{tuple(tok2.shape)}")
    return torch.cat([tok, tok2]), torch.cat([keep, keep2])


class CaptionContrast:
    """The objective's loss plus λ · L_contrast (module docstring), from one forward over the caption and its
    counterfactual. `objective` is a dit.objectives objective (its noised / loss_terms / prediction_error /
    sample_weight / noise_level steps)."""

    def __init__(self, objective, weight: float, margin: float = 0.05, noise_from: float = 0.4):
        if weight <= 0 or margin < 0 or not 0 <= noise_from < 1:
            raise ValueError(f"caption contrast needs weight > 0, margin >= 0 and 0 <= noise_from < 1; got {weight}, "
                             f"{margin}, {noise_from}")
        self.objective, self.weight, self.margin, self.noise_from = objective, weight, margin, noise_from

    def __call__(self, model_fn, x0: Tensor, cond, counter, draws: tuple[Tensor, Tensor], caption_kept: Tensor) -> dict:
        """`cond` / `counter`: the text conditions of the captions and of their counterfactuals (tokens, keep);
        `draws` (t, noise); `caption_kept` (B,) bool: rows whose caption was not dropped to the empty prompt."""
        obj = self.objective
        t_B, noise = draws
        B = x0.shape[0]
        x_t, model_t = obj.noised(x0, noise, t_B)
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([model_t, model_t]), _stack_text(cond, counter))
        err_true = obj.prediction_error(out[:B], x0, x_t, noise, t_B)
        terms = obj.loss_terms(out[:B], x0, x_t, noise, t_B, error=err_true)
        err_counter = obj.prediction_error(out[B:], x0, x_t, noise, t_B)
        active = caption_kept.to(t_B.device) & (obj.noise_level(t_B) >= self.noise_from)
        contrast = contrast_loss(err_true, err_counter, obj.sample_weight(t_B), active, self.margin)
        return {**terms, "loss": terms["loss"] + self.weight * contrast, "contrast": contrast.detach(),
                "contrast_gap": relative_gap(err_true.detach(), err_counter.detach(), active)}
