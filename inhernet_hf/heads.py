"""Heads fitted at inheritance time (`InherConfig(head_init="fitted")`): the whitened down-projection W_d stays
fixed; the gate and the M up-projection heads are fitted to the dense layer's outputs on calibration tokens.

    J(G, c, U) = sum_i || W x_i - sum_m g_m(h_i) U_m h_i ||^2,     h_i = W_d x_i,   g = softmax(G h + c)

The start is the whitened init, M identical heads (objective J_0): a single rank-r map, whatever the gate. Gate
directions come from spherical k-means of the latent tokens (a cosine-Voronoi cell is what softmax(beta C h) selects
as beta grows), their sharpness beta from a grid; then rounds of heads (the joint least-squares problem for fixed
gates, closed form) and gate (L-BFGS on the per-token quadratic in g, heads fixed). Everything runs in float64, and
the best (G, c, U) seen is kept, so J <= J_0 always: the mixture can only be a better piecewise map of h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BETAS = (1.0, 2.0, 4.0, 8.0, 16.0)  # gate sharpness, in units of 1 / (median token norm of h)


@dataclass
class FittedHeads:
    gate_weight: torch.Tensor  # (M, r)
    gate_bias: torch.Tensor  # (M,)
    heads: torch.Tensor  # (M, out, r)
    start: float  # J_0, identical heads
    objective: float  # J of the fitted heads (<= start)
    target: float  # sum_i ||W x_i||^2, the scale of J


def fit_gated_heads(inputs: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, head: torch.Tensor,
                    num_heads: int, rounds: int = 3, seed: int = 0) -> FittedHeads:
    """Fit a softmax gate and `num_heads` heads to `weight` (out, in) on `inputs` (N, in), with `down` (r, in) fixed
    and `head` (out, r), the identical-heads start. Returns float64 tensors."""
    x = inputs.double()
    h = x @ down.double().T  # (N, r)
    t = x @ weight.double().T  # (N, out); the heads keep the teacher's bias, and sum_m g_m = 1
    n, r = h.shape
    target = float(t.square().sum())
    identical = head.double().expand(num_heads, -1, -1).clone()
    zero_gate = torch.zeros(num_heads, r, dtype=torch.float64, device=h.device)
    zero_bias = torch.zeros(num_heads, dtype=torch.float64, device=h.device)
    start = float((t - h @ head.double().T).square().sum())  # identical heads: one rank-r map, whatever the gate
    best = FittedHeads(zero_gate, zero_bias, identical, start, start, target)
    if num_heads == 1 or n < num_heads * r:  # one head, or too few tokens to determine M heads
        return best

    def consider(gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> None:
        nonlocal best
        heads, objective = _solve_heads(h, _gates(h, gate_weight, gate_bias), t, x, weight, target)
        if objective < best.objective:
            best = FittedHeads(gate_weight, gate_bias, heads, start, objective, target)

    scale = h.norm(dim=1).median().clamp_min(torch.finfo(h.dtype).tiny)
    centroids = _spherical_kmeans(h, num_heads, torch.Generator(device="cpu").manual_seed(seed))
    for beta in BETAS:
        consider(beta / scale * centroids, zero_bias)
    for _ in range(rounds):
        gate_weight, gate_bias = _fit_gate(h, best.heads, t, best.gate_weight, best.gate_bias)
        consider(gate_weight, gate_bias)
    return best


def _gates(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(h @ gate_weight.T + gate_bias, dim=-1)  # (N, M)


def _mixture_inputs(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(N, M*r): block m is g_m h, the input the concatenated heads [U_1 ... U_M] multiply."""
    return (gates[:, :, None] * h[:, None, :]).reshape(h.shape[0], -1)


def _solve_heads(h: torch.Tensor, gates: torch.Tensor, t: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 target: float) -> tuple[torch.Tensor, float]:
    """The heads (M, out, r) minimising J for fixed gates, and that J: normal equations of the (N, M*r) design Z,
    with a jitter of 1e-10 of the mean diagonal (the uniform gate makes the M blocks identical, so the system is
    singular there). J = |T|^2 - 2 <U, Z^T T> + <U, U Z^T Z> needs no (N, out) residual."""
    z = _mixture_inputs(h, gates)
    gram = z.T @ z
    # Z^T T with T = X W^T: through the narrower of in / out
    cross = (z.T @ x) @ weight.double().T if x.shape[1] < t.shape[1] else z.T @ t  # (M*r, out)
    jittered = gram.clone()
    jittered.diagonal().add_(1e-10 * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny))
    up_t = torch.linalg.solve(jittered, cross)  # (M*r, out): the heads' weights, transposed
    objective = target - 2 * float((up_t * cross).sum()) + float((up_t * (gram @ up_t)).sum())
    m, r = gates.shape[1], h.shape[1]
    return up_t.T.reshape(-1, m, r).permute(1, 0, 2).contiguous(), max(objective, 0.0)


def _fit_gate(h: torch.Tensor, heads: torch.Tensor, t: torch.Tensor, gate_weight: torch.Tensor,
              gate_bias: torch.Tensor, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on J over the gate with the heads fixed. Per token J_i = |t|^2 - 2 g.a + g^T K g, where
    a_m = <t, U_m h> and K_mk = <U_m h, U_k h>: (N, M) and (N, M, M) computed once, so a step costs O(N M^2)."""
    outputs = torch.einsum("nr,mor->nmo", h, heads)  # (N, M, out)
    a = torch.einsum("no,nmo->nm", t, outputs)
    k = torch.einsum("nmo,nko->nmk", outputs, outputs)
    del outputs
    scale = float(t.square().sum())
    weight = gate_weight.clone().requires_grad_(True)
    bias = gate_bias.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        g = _gates(h, weight, bias)
        loss = (torch.einsum("nm,nmk,nk->", g, k, g) - 2 * (g * a).sum()) / scale
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _spherical_kmeans(h: torch.Tensor, m: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """(m, r) unit centroids of the token directions h / |h| (k-means++ seeding, cosine assignments)."""
    directions = torch.nn.functional.normalize(h, dim=1)
    first = int(torch.randint(directions.shape[0], (1,), generator=generator))
    centroids = directions[first:first + 1]
    while centroids.shape[0] < m:
        distance = (1 - (directions @ centroids.T).amax(dim=1)).clamp_min(0).cpu()
        pick = int(torch.multinomial(distance + 1e-12, 1, generator=generator))
        centroids = torch.cat([centroids, directions[pick:pick + 1]])
    for _ in range(iters):
        assign = (directions @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, directions)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centroid
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids
