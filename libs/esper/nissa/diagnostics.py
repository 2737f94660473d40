"""Diagnostics that cost real compute, so that only the DEBUG telemetry level asks for them.

Sharpness is the top eigenvalue of the loss Hessian (Keskar et al. 2017; Cohen et al. 2021 watch it
rise to 2 / learning rate at the edge of stability). Power iteration on Hessian-vector products
(Pearlmutter 1994: the gradient of <grad, v>) never forms the Hessian: each iteration costs one double
backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


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
