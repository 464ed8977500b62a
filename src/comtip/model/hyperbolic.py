"""Lorentz-hyperboloid geometry and the entailment-cone loss of MERU (Desai et al. 2023), which
DELST (arXiv 2503.00804) uses for image–gene pretraining (``model.entailment``, docs/model.md).

Points are stored by their space components ``x`` (…, D); the time component is
``sqrt(1/c + ||x||²)``, so every point lies on the hyperboloid <x, x>_L = -1/c.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6
MAX_SINH_ARG = math.asinh(2.0**15)  # MERU's clamp of the exponential map


def time_component(x: torch.Tensor, curv: torch.Tensor | float) -> torch.Tensor:
    """x_time = sqrt(1/c + ||x_space||²), shape (…)."""
    return torch.sqrt(1.0 / curv + (x * x).sum(dim=-1))


def lorentz_inner(x: torch.Tensor, y: torch.Tensor, curv: torch.Tensor | float) -> torch.Tensor:
    """<x, y>_L = <x_space, y_space> - x_time · y_time (paired rows)."""
    return (x * y).sum(dim=-1) - time_component(x, curv) * time_component(y, curv)


def exp_map0(v: torch.Tensor, curv: torch.Tensor | float) -> torch.Tensor:
    """Exponential map at the origin: tangent v → space components sinh(√c‖v‖)·v/(√c‖v‖)."""
    rc_norm = (
        math.sqrt(curv) * v.norm(dim=-1, keepdim=True)
        if isinstance(curv, float)
        else (torch.sqrt(curv) * v.norm(dim=-1, keepdim=True))
    )
    arg = rc_norm.clamp(min=EPS, max=MAX_SINH_ARG)
    return torch.sinh(arg) * v / arg


def half_aperture(x: torch.Tensor, curv: torch.Tensor | float, min_radius: float = 0.1) -> torch.Tensor:
    """Half-aperture of x's entailment cone: arcsin(2K / (√c ‖x_space‖)), clamped."""
    ratio = 2.0 * min_radius / (math.sqrt(curv) if isinstance(curv, float) else torch.sqrt(curv))
    ratio = ratio / (x.norm(dim=-1) + EPS)
    return torch.asin(ratio.clamp(-1.0 + EPS, 1.0 - EPS))


def exterior_angle(x: torch.Tensor, y: torch.Tensor, curv: torch.Tensor | float) -> torch.Tensor:
    """Exterior angle at x between the origin and y (MERU's ``oxy_angle``), paired rows."""
    x_time, y_time = time_component(x, curv), time_component(y, curv)
    c_xyl = curv * ((x * y).sum(dim=-1) - x_time * y_time)
    numer = y_time + c_xyl * x_time
    denom = x.norm(dim=-1) * torch.sqrt((c_xyl**2 - 1).clamp(min=EPS))
    return torch.acos((numer / (denom + EPS)).clamp(-1.0 + EPS, 1.0 - EPS))


def entailment_loss(
    parent: torch.Tensor, child: torch.Tensor, curv: torch.Tensor | float, min_radius: float = 0.1
) -> torch.Tensor:
    """Mean over pairs of relu(ext(parent, child) - aper(parent)): 0 when each child lies in
    its parent's cone."""
    return F.relu(exterior_angle(parent, child, curv) - half_aperture(parent, curv, min_radius)).mean()
