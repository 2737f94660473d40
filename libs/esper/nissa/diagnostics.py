"""Diagnostics that cost real compute, so that only the DEBUG telemetry level asks for them.

Gradient health (`GradientMonitor`): the L2 norm of each host layer's and each seed's gradient, batch
by batch, summed and maxed on the device and read once per epoch (a per-batch `.item()` would stall a
GPU's queue every step). Thresholds, on the norm of one layer's whole gradient:
- vanishing: mean below 1e-6. A layer whose gradient is that small does not move at SGD's 0.01; the
  case it is there for is a seed that receives no gradient at all (norm exactly 0), as a zero-scale
  BatchNorm before a final ReLU does (FIELD-NOTES: such a seed stays dead).
- exploding: largest above 100, or not finite. PPO and most recipes clip a whole network's gradient
  at 0.5-1; one layer 100x past that, even for one batch, is a step the governor may have to undo.

Sharpness is the top eigenvalue of the loss Hessian (Keskar et al. 2017; Cohen et al. 2021 watch it
rise to 2 / learning rate at the edge of stability). Power iteration on Hessian-vector products
(Pearlmutter 1994: the gradient of <grad, v>) never forms the Hessian: each iteration costs one double
backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from esper.leyline import LayerGradient

VANISHING_BELOW = 1e-6
EXPLODING_ABOVE = 100.0


class GradientMonitor:
    """Gradient norms per named group of parameters over one epoch.

    `groups`: name -> parameters (a parameter in two groups, as a tied embedding is, counts in the
    first). Call `accumulate()` after each backward pass and `read()` once at the end of the epoch.
    """

    def __init__(self, groups: dict[str, list[torch.Tensor]], vanishing_below: float = VANISHING_BELOW,
                 exploding_above: float = EXPLODING_ABOVE):
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        owners: list[int] = []
        for index, params in enumerate(groups.values()):
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
                    owners.append(index)
        self.names = list(groups)
        self.vanishing_below = vanishing_below
        self.exploding_above = exploding_above
        device = self.params[0].device if self.params else torch.device("cpu")
        self.owners = owners
        self.owner_index = torch.tensor(owners, device=device, dtype=torch.long)  # [P] group of each parameter
        self.reached: set[int] = set()
        """Groups that had a gradient in some batch (host-side bookkeeping: no device value is read)."""
        self.norm_sum = torch.zeros(len(self.names), device=device)      # [G]
        self.norm_max = torch.zeros(len(self.names), device=device)      # [G]
        self.zero = torch.zeros((), device=device)  # the norm of a parameter that got no gradient
        self.batches = 0

    def accumulate(self) -> None:
        """Fold the current gradients in, with device ops only (no host sync). A parameter without a
        gradient this batch (a slot the forward skipped) adds nothing to its group."""
        has = [p.grad is not None for p in self.params]
        if any(has):
            self.reached.update(o for o, h in zip(self.owners, has) if h)
            # One fused kernel for every parameter's norm, as clip_grad_norm_ does it.
            present = iter(torch._foreach_norm([p.grad for p, h in zip(self.params, has) if h]))
            norms = torch.stack([next(present).float() if h else self.zero for h in has])  # [P]
            squares = torch.zeros_like(self.norm_sum).index_add_(0, self.owner_index, norms * norms)
            group_norms = squares.sqrt()  # [G]
            self.norm_sum += group_norms
            # torch.maximum propagates NaN, so a non-finite batch stays visible in the maximum.
            torch.maximum(self.norm_max, group_norms, out=self.norm_max)
        self.batches += 1

    def read(self) -> list[LayerGradient]:
        """One device->host transfer: each group's mean and largest norm over the batches, flagged. A
        group no backward pass reached (a GERMINATED seed, outside the forward until it trains) has no
        gradient to judge and is left out; one reached with zeros is reported vanishing."""
        if not self.batches:
            return []
        sums, maxima = torch.stack([self.norm_sum, self.norm_max]).tolist()
        report = []
        for index, (name, total, largest) in enumerate(zip(self.names, sums, maxima)):
            if index not in self.reached:
                continue
            mean = total / self.batches
            report.append(LayerGradient(
                layer=name, mean_norm=mean, max_norm=largest, vanishing=mean < self.vanishing_below,
                exploding=not math.isfinite(largest) or largest > self.exploding_above))
        return report


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], iters: int = 20,
                           tol: float = 1e-3, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of d2 loss_fn() / d params2, by power iteration from a
    seeded random direction; stops when the estimate changes by less than `tol` (relative)."""
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    # A parameter the loss does not reach (a seed the forward skips) has no curvature to measure.
    params, grads = zip(*[(p, g) for p, g in zip(params, grads) if g is not None])
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator).to(p.device) for p in params]
    eigenvalue = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        if norm == 0.0:
            return 0.0  # the Hessian maps the direction to zero: the loss is flat along it
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]
        estimate = sum(float((h * x).sum()) for h, x in zip(hv, v))  # Rayleigh quotient v.Hv, |v| = 1
        converged = abs(estimate - eigenvalue) <= tol * abs(estimate)
        eigenvalue, v = estimate, hv
        if converged:
            break
    return eigenvalue
