"""Shared ODE maths of the continuous-time likelihood families (score SDEs' probability-flow ODE, FFJORD).

- :func:`per_image`: noise drawn row by row from each image's own generator;
- :func:`hutchinson_divergence` (Hutchinson 1989; FFJORD's estimator) and :func:`exact_divergence`
  (one backward pass per dimension, for small inputs);
- :func:`dequantize`: uniform dequantisation on [0, 1];
- :func:`rk45`: Dormand-Prince 5(4) with a step size per image, so that an image's solution (a sample, a
  log-likelihood) does not depend on the batch around it. torchdiffeq's and scipy's solvers share one step
  size over a batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def per_image(draw: str, generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """[B, *shape] float32, row i drawn from generators[i] (``randn``, ``rand`` or ``rademacher``)."""
    rows = []
    for g in generators:
        if draw == "rademacher":
            r = torch.randint(0, 2, tuple(shape), generator=g, device=g.device).float() * 2 - 1
        else:
            r = getattr(torch, draw)(tuple(shape), generator=g, device=g.device)
        rows.append(r.to(device))
    return torch.stack(rows)


def hutchinson_divergence(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of div_x out(x) per image: the mean over probes v ([B, K, *x]) of v^T (d out/dx) v,
    one vector-Jacobian product each (exact for any probe: an unbiased estimate of the trace)."""
    k, total = probes.shape[1], 0
    for j in range(k):
        (vjp,) = torch.autograd.grad(out, x, grad_outputs=probes[:, j], retain_graph=j < k - 1)
        total = total + (vjp * probes[:, j]).flatten(1).sum(1)
    return total / k


def exact_divergence(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """div_x out(x) per image, exactly: one vector-Jacobian product per dimension (D backward passes, for
    small inputs). ``out`` must depend on each image's own row of ``x`` only."""
    flat, d = out.flatten(1), out[0].numel()
    total = 0
    for i in range(d):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < d - 1)
        total = total + g.flatten(1)[:, i]
    return total


def dequantize(images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """uint8 NCHW -> (x + u) / 256 on [0, 1], float64, u ~ U[0, 1)^D from each image's generator (its first draw)."""
    u = per_image("rand", generators, images.shape[1:], images.device).double()
    return (images.double() + u) / 256


# Dormand-Prince 5(4), the tableau of scipy's RK45 (score_sde's solver)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # 5th minus 4th order


def rk45(f: Callable, y0: torch.Tensor, t0: float, t1: float, tol: float, max_steps: int = 20000,
         atol: Optional[float] = None, what: str = "the probability-flow ODE (model.ode_tol)") -> torch.Tensor:
    """y(t1) of dy/dt = f(y, t, rows) from y(t0) = y0 ([B, N] float64), each row with its own adaptive step.

    scipy's RK45 with rtol = ``tol`` and atol = ``atol`` (default: ``tol``), its initial step, error norm
    and step factors, except that the error norm and the step size are per row: ``f`` gets the rows still
    running (``rows`` indexes ``y0``) with their own times ``t`` [b], so a row's solution does not depend
    on the others. ``what`` names the ODE and its tolerance setting in the error when it does not finish.
    """
    atol = tol if atol is None else atol
    n, sign = y0.shape[0], (1.0 if t1 > t0 else -1.0)
    y, rows = y0.clone(), torch.arange(n, device=y0.device)
    t = torch.full((n,), float(t0), dtype=torch.float64, device=y0.device)
    rms = lambda v: v.pow(2).mean(1).sqrt()  # noqa: E731
    k1 = f(y, t, rows)
    # scipy's select_initial_step, per row
    scale = atol + tol * y.abs()
    d0, d1 = rms(y / scale), rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-30))
    h0 = torch.minimum(h0, torch.full_like(h0, abs(t1 - t0)))
    d2 = rms((f(y + sign * h0[:, None] * k1, t + sign * h0, rows) - k1) / scale) / h0
    dm = torch.maximum(d1, d2)
    h1 = torch.where(dm <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dm.clamp(min=1e-30)) ** 0.2)
    h = sign * torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, abs(t1 - t0)))
    for _ in range(max_steps):
        if len(rows) == 0:
            return y
        ya, ta, ha = y[rows], t[rows], h[rows]
        ks = [k1[rows]]
        for c, a in zip(_C[1:], _A[1:]):
            yi = ya + ha[:, None] * sum(w * k for w, k in zip(a, ks) if w)
            ks.append(f(yi, ta + c * ha, rows))
        # the last stage ran at the 5th-order solution yi (first same as last: it is the next step's k1)
        err = ha[:, None] * sum(w * k for w, k in zip(_E, ks) if w)
        norm = rms(err / (atol + tol * torch.maximum(ya.abs(), yi.abs())))
        ok = norm <= 1
        factor = (0.9 * norm.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        factor = torch.where(ok, factor, factor.clamp(max=1.0))
        last = ok & ((t1 - ta).abs() <= ha.abs() * (1 + 1e-12))
        done = rows[ok]
        y[done], k1[done] = yi[ok], ks[-1][ok]
        t[done] = torch.where(last[ok], torch.full_like(ta[ok], float(t1)), ta[ok] + ha[ok])
        h[rows] = sign * torch.minimum(ha.abs() * factor, (t1 - t[rows]).abs())
        rows = rows[~last]
    raise RuntimeError(f"{what} took more than {max_steps} steps at tolerance {tol}; the network's dynamics "
                       f"may be diverging")
