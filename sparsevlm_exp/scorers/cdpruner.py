"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"; official code Theia-4869/CDPruner): before the
LLM, keep the visual tokens that a determinantal point process over an
instruction-conditioned kernel finds most diverse, by greedy MAP inference.

Kernel (official construction):
  S_ij = cos(x_i, x_j)                                  feature similarity
  r_i  = mean over instruction tokens t of -cos(x_i, t), min-max normalised to [0, 1]
         (the official code negates the similarity; kept as it is, `negate: true`)
  r_i <- exp(alpha r_i), alpha = theta / (2 (1 - theta)), theta = 0.5 by default
  L_ij = r_i S_ij r_j
MAP: the fast greedy algorithm (Chen, Zhang, Zhou, NeurIPS 2018): repeatedly add the
item with the largest marginal gain in log det L_S, updating a Cholesky factor
incrementally (O(N n) memory, O(N n^2) time).

Rank used up: L has rank <= D (the feature width), and a budget n can exceed it (the
embedded model: width 128, 256 visual tokens, keep 0.5 -> n = 128). Once the largest
remaining gain is at most EXHAUSTED = 1e-5 of the largest diagonal entry (fp32 rounding
level of a gain), no item adds volume any more; the plain algorithm would go on dividing
by sqrt(noise), its numbers overflow to NaN, and argmax then returns items already
picked (it did: on the embedded model CDPruner at keep 0.5 kept 93 distinct tokens, not
128). Here the remaining slots are then filled with the unpicked items by relevance
(largest L_ii = w_i^2 first, lower index on ties): a stated rule, the same in every loop.

Substitute: the official LLaVA code compares CLIP image embeddings with CLIP text
embeddings of the instruction; here both sides are LLM-space (the projected visual
features and the instruction tokens' input embeddings, what the pre-LLM view carries).
"""
from __future__ import annotations

import numpy as np
import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer


def instruction_relevance(features: torch.Tensor, text: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """[N] fp32 relevance r of visual features [N, D] to instruction embeddings [T, D]:
    the mean cosine over the instruction tokens (negated with `negate`, as the official
    code does), min-max normalised to [0, 1]; zeros before normalising if T = 0."""
    x = torch.nn.functional.normalize(features.detach().float(), dim=-1)   # selection: no autograd
    return _relevance(x, text, negate)


def _relevance(unit: torch.Tensor, text: torch.Tensor, negate: bool) -> torch.Tensor:
    """instruction_relevance from the already normalised features unit [N, D] (fp32)."""
    t = torch.nn.functional.normalize(text.detach().float(), dim=-1)
    r = (unit @ t.T).mean(dim=-1) if t.shape[0] else torch.zeros(unit.shape[0], device=unit.device)
    r = -r if negate else r
    return (r - r.min()) / (r.max() - r.min() + 1e-6)


def conditional_kernel(features: torch.Tensor, text: torch.Tensor, theta: float = 0.5,
                       negate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel [N, N], relevance [N]) fp32 for visual features [N, D] and instruction
    embeddings [T, D]: L_ij = (S_ij w_i) w_j with S the cosine matrix and
    w = exp(theta / (2 (1 - theta)) r); relevance is the min-max normalised r before the exp
    (instruction_relevance)."""
    x = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    r = _relevance(x, text, negate)
    weight = torch.exp(theta / (2 * (1 - theta)) * r) if theta != 1 else r
    return (x @ x.T).mul_(weight[:, None]).mul_(weight[None, :]), r


def conditional_dpp_map(features: torch.Tensor, text: torch.Tensor, n: int, theta: float = 0.5,
                        negate: bool = True,
                        unit_relevance: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.LongTensor:
    """[n] items (pick order): the greedy MAP of the DPP with kernel
    conditional_kernel(features, text, theta, negate)[0], i.e. dpp_greedy_map of that kernel.

    On a CPU the N x N kernel is never formed: _dpp_greedy_blocked works from the
    normalised features and the weights w (kernel L_ij = w_i w_j <x_i, x_j>) and forms
    only the rows of the picked items. Its sums run in another order than the plain loop's,
    so where two gains tie to within fp32 rounding (duplicate tokens, a kernel whose rank is
    exhausted) the pick may go the other way; elsewhere the picks are the plain loop's
    (tests/test_peers.py). unit_relevance: (normalised features [N, D], relevance [N]) of
    these very features, when the caller has them (CDPrunerScorer.__call__ computed them
    for the recorded score)."""
    if unit_relevance is None:
        unit = torch.nn.functional.normalize(features.detach().float(), dim=-1)
        r = _relevance(unit, text, negate)
    else:
        unit, r = unit_relevance
    weight = torch.exp(theta / (2 * (1 - theta)) * r) if theta != 1 else r
    if unit.device.type != "cpu":
        return dpp_greedy_map((unit @ unit.T).mul_(weight[:, None]).mul_(weight[None, :]), n)
    n = min(n, unit.shape[0])
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return _dpp_greedy_blocked(unit.contiguous().numpy(), weight.numpy(), n)


def _dpp_greedy_blocked(unit: np.ndarray, weight: np.ndarray, n: int, block: int = 16,
                        pool: int = 64) -> torch.LongTensor:
    """[n] items (pick order) of the greedy DPP MAP for the kernel L_ij = w_i w_j <x_i, x_j>,
    from unit [N, D] fp32 (the rows x_i) and weight [N] fp32, on a CPU; 1 <= n <= N.

    Chen, Zhang & Zhou (NeurIPS 2018), Algorithm 1, with delayed updates (as in a blocked
    Cholesky factorisation). The plain loop (_dpp_greedy_host) updates all N gains at every
    pick: n passes over a growing k x N factor and a full N x N kernel (at 256 of 1,024
    tokens of width 512: ~15 ms for the kernel, ~8 ms for the loop, one core). Here:
      - the gains of ALL items are brought up to date once per `block` picks, with matrix
        products: the picked items' kernel rows w_P w (x_P X^T) [b, N], minus the earlier
        factor rows' share, then E = T^-1 (that) with T [b, b] the picks' own lower-
        triangular factor entries (the same recurrence the plain loop runs row by row);
      - between updates, the picks come from a pool of the `pool` largest gains, whose
        gains are kept exact pick by pick on their [pool, pool] kernel block. A gain only
        ever decreases, so every gain outside the pool is at most its value at the last
        update: a pool pick whose gain is strictly above all of those is the argmax over
        all N, as in the plain loop. When it is not, the block ends early (a tie with an
        item outside the pool goes the same way, so ties go to the lower index as in
        the plain loop).
    Only n of the N kernel rows are ever formed. Rank used up (the best gain of all N at
    most EXHAUSTED * max L_ii): the rest by L_ii, as in the plain loop."""
    N = unit.shape[0]
    quality = (np.einsum("ij,ij->i", unit, unit) * weight) * weight                    # L_ii, [N]
    gain = quality.copy()                  # exact gains of all items through `done` factor rows
    floor = max(float(quality.max()), 0.0) * EXHAUSTED
    factors = np.zeros((n, N), dtype=np.float32)                                       # rows e_k over all items
    picks: list[int] = []
    done = 0
    used_up = False
    while done < n and not used_up:
        todo = min(block, n - done)
        m = min(pool, N - done)                                                        # unpicked items left
        if m < N - done:
            cand = np.sort(np.argpartition(-gain, m - 1)[:m])                          # index order: ties -> lower
            outside = gain.copy()
            outside[cand] = -np.inf
            bound = outside.max()
        else:
            cand = np.setdiff1d(np.arange(N), picks)
            bound = -np.inf
        xc, wc = unit[cand], weight[cand]
        kc = ((xc @ xc.T) * wc[:, None]) * wc[None, :]                                 # L[cand, cand]
        fc = np.empty((done + todo, cand.shape[0]), dtype=np.float32)                  # factor columns of the pool
        fc[:done] = factors[:done, cand]
        gc = gain[cand]                                                                # exact gains of the pool
        local, diag = [], []
        for t in range(todo):
            p = int(gc.argmax())
            if not gc[p] > bound:      # an item outside the pool may be as good: update all first
                break
            if not gc[p] > floor:      # the best of all N is noise: rank used up
                used_up = True
                break
            k = done + t
            d = np.sqrt(gc[p])
            e = fc[k]
            np.subtract(kc[p], fc[:k, p] @ fc[:k], out=e)
            e /= d
            gc -= e * e
            gc[p] = -np.inf
            local.append(p)
            diag.append(d)
        if not local and not used_up:  # the pool's best is not above every outsider: the true argmax
            j = int(gain.argmax())
            if not gain[j] > floor:
                used_up = True
            else:
                cand, local, diag = np.array([j]), [0], [np.sqrt(gain[j])]
                fc = factors[:done, j:j + 1]
        b = len(local)
        if b == 0:
            break
        picked = cand[local]
        rows = ((unit[picked] @ unit.T) * weight[picked][:, None]) * weight[None, :]   # L[P, :], [b, N]
        if done:
            rows -= fc[:done, local].T @ factors[:done]
        lower = np.tril(fc[done:done + b, local].T, -1) if b > 1 else np.zeros((1, 1), dtype=np.float32)
        lower[np.diag_indices(b)] = diag                                               # T [b, b]
        E = factors[done:done + b]
        np.matmul(np.linalg.inv(lower), rows, out=E)
        gain -= np.einsum("ij,ij->j", E, E)
        gain[picked] = -np.inf                       # stays -inf: later updates subtract finite numbers
        picks.extend(picked.tolist())
        done += b
    if done < n:
        picks += _by_quality(quality, picks, n - done)
    return torch.tensor(picks, dtype=torch.long)


EXHAUSTED = 1e-5   # a gain at most this share of max_i L_ii is rounding noise: rank used up


def dpp_greedy_map(kernel: torch.Tensor, n: int) -> torch.LongTensor:
    """[n] distinct items picked by greedy MAP inference of the DPP with kernel [N, N]
    (pick order). gain_i = L_ii - ||c_i||^2 (the squared Cholesky diagonal if i were
    added); ties go to the lower index. Once the largest remaining gain is at most
    EXHAUSTED * max L_ii (the kernel's rank is used up), the rest are the unpicked items
    by L_ii, largest first (module docstring), so exactly n distinct items come back.

    Chen, Zhang & Zhou (NeurIPS 2018), Algorithm 1: picking j appends the row
    e = (L_j - c_j^T C) / sqrt(gain_j) to the factor C [k, N] and lowers every gain by
    e_i^2 (O(N n) memory, O(N n^2) time). Checked against a greedy that recomputes
    det L_S from scratch (tests/test_peers.py)."""
    N = kernel.shape[0]
    n = min(n, N)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=kernel.device)
    L = kernel.detach().float()
    greedy = _dpp_greedy_host if L.device.type == "cpu" else _dpp_greedy_device
    return greedy(L, n)


def _dpp_greedy_device(L: torch.Tensor, n: int) -> torch.LongTensor:
    """The greedy steps as device ops with no host round trip (for accelerators): each step
    indexes with 1-element index tensors (index_select / index_fill_; Python indexing with
    a tensor may sync and costs more) and writes e straight into the factor (addmm).
    The rank-used-up rule without a branch: once a step's best gain is <= the threshold,
    `used_up` stays true, the pick is the best unpicked L_ii and the update is zero."""
    quality = torch.diagonal(L).clone()                                               # L_ii, [N]
    gain = quality.clone()
    floor = quality.max().clamp(min=0) * EXHAUSTED
    unpicked_quality = quality.clone()                                                # -inf once picked
    factors = torch.zeros(n, L.shape[0], dtype=L.dtype, device=L.device)              # rows c_k
    used_up = torch.zeros(1, dtype=torch.bool, device=L.device)
    picks = []
    for k in range(n):
        best = gain.argmax(dim=0, keepdim=True)                                       # [1]
        used_up = used_up | ~(gain.index_select(0, best) > floor)
        j = torch.where(used_up, unpicked_quality.argmax(dim=0, keepdim=True), best)
        picks.append(j)
        e = factors[k:k + 1]                                                          # [1, N] view, written in place
        # e = L_j - c_j^T C_{<k}  (c_j = column j of the factor rows so far)
        torch.addmm(L.index_select(0, j), factors[:k].index_select(1, j).T, factors[:k], beta=1, alpha=-1, out=e)
        e.div_(gain.index_select(0, j).clamp_(min=1e-12).sqrt_())
        e.mul_(~used_up)                                                              # no update once used up
        gain.addcmul_(e[0], e[0], value=-1)
        gain.index_fill_(0, j, -float("inf"))   # stays -inf: later updates subtract finite numbers
        unpicked_quality.index_fill_(0, j, -float("inf"))
    return torch.cat(picks)


def _dpp_greedy_host(L: torch.Tensor, n: int) -> torch.LongTensor:
    """The same steps on a CPU tensor through numpy views of it (no copy of L): a torch op
    costs ~3-5 us of dispatch, numpy's ~1 us, and the loop is n steps of ~8 small ops.
    fp32 like the device loop; its dot products may round differently (another BLAS), so
    the two are each checked against the determinant greedy rather than against each
    other. This is the plain reference for _dpp_greedy_blocked (tests/test_peers.py)."""
    K = L.numpy()
    quality = np.diagonal(K).copy()                                                    # L_ii, [N]
    gain = quality.copy()
    floor = max(float(quality.max()), 0.0) * EXHAUSTED
    factors = np.zeros((n, K.shape[0]), dtype=K.dtype)                                # rows c_k
    square = np.empty(K.shape[0], dtype=K.dtype)
    picks: list[int] = []
    for k in range(n):
        j = int(gain.argmax())
        if not gain[j] > floor:                                                        # rank used up (or NaN)
            return torch.tensor(picks + _by_quality(quality, picks, n - k), dtype=torch.long)
        picks.append(j)
        e = factors[k]                                                                 # written in place
        np.subtract(K[j], factors[:k, j] @ factors[:k], out=e)
        e /= np.sqrt(gain[j])
        np.multiply(e, e, out=square)
        gain -= square
        gain[j] = -np.inf                        # stays -inf: later updates subtract finite numbers
    return torch.tensor(picks, dtype=torch.long)


def _by_quality(quality: np.ndarray, picks: list[int], count: int) -> list[int]:
    """`count` unpicked items by quality [N] (L_ii), largest first, lower index on ties."""
    rest = np.setdiff1d(np.arange(quality.shape[0]), picks)
    return rest[np.argsort(-quality[rest], kind="stable")[:count]].tolist()


class CDPrunerScorer(Scorer):
    """Pre-LLM (layer=-1): conditional DPP, see the module docstring. The recorded score
    is the instruction relevance r (normalised, before the exp)."""

    stages = (STAGE_PRE_LLM,)
    selects = True

    def __init__(self, theta: float = 0.5, negate: bool = True, relevance_space: str = "llm_embeddings"):
        if isinstance(theta, bool) or not 0 <= theta <= 1:
            raise ValueError(f"scorer.theta={theta!r} is not allowed: a float in [0, 1]")
        self.theta, self.negate, self.relevance_space = float(theta), bool(negate), relevance_space

    def __call__(self, view: LayerView) -> torch.Tensor:
        # the normalised features and r, reused by select on this same view (a per-image
        # subset view starts with empty outputs and computes its own, normalised per image)
        parts = []
        for x, t in zip(view.visual_features, view.text_embeds):
            unit = torch.nn.functional.normalize(x.detach().float(), dim=-1)
            parts.append((unit, _relevance(unit, t, self.negate)))
        view.outputs["cdpruner_unit_relevance"] = parts
        return torch.stack([r for _, r in parts])                                     # [B, N]

    def select(self, scores, view: LayerView, n: int) -> torch.LongTensor:
        # The kernel is built here, over the view's tokens: all of them, or one image's
        # under per-image allocation (relevance then min-max normalised within the image,
        # as if the method ran on that image alone).
        parts = view.outputs.pop("cdpruner_unit_relevance", None) or [None] * len(view.visual_features)
        return torch.stack([conditional_dpp_map(x, t, n, self.theta, self.negate, p)
                            for x, t, p in zip(view.visual_features, view.text_embeds, parts)])
