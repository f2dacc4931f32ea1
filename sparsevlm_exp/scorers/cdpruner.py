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
embedded model: width 128, 256 visual tokens, keep 0.5 -> n = 128). A gain at most
EXHAUSTED = 1e-4 of its OWN item's diagonal entry L_ii is rounding noise: it is L_ii
minus a sum of k squares of about L_ii's size, so after k picks its fp32 error is up to
~2 k u L_ii (u = 6e-8; ~1.5e-5 L_ii at k = 128); 1e-4 also means the token lies within
0.6 degrees of the span of the picked ones, a near duplicate. A pick whose gain is noise
for its item is skipped for the best gain that is not; once every remaining gain is
noise, no item adds volume any more and the remaining slots are filled with the unpicked
items by relevance (largest L_ii = w_i^2 first, lower index on ties): a stated rule, the
same in every loop. The plain algorithm would go on dividing by sqrt(noise), its numbers
overflow to NaN, and argmax then returns items already picked (it did: on the embedded
model CDPruner at keep 0.5 kept 93 distinct tokens, not 128).
Per item, not relative to the LARGEST L_ii: L_ii = exp(2 alpha r_i) spans e^(2 alpha),
over 1e5 from theta ~0.93 (alpha ~6), and a low-relevance token's gain below that share of
max L_ii is still most of its own L_ii, real volume on a full-rank kernel (a max-based
stop ended the greedy there; tests/test_peers.py, theta 0.95). Not 1e-5 per item: after
~100 picks that is within a gain's own fp32 error (~1.2e-5 L_ii), so the picks just above
it follow rounding as much as volume; 1e-4 keeps a margin of ~8x there. On the embedded
model (first 100 `test` questions, keep 0.5) the rule fires after 41-75 picks (median
54); at 1e-5 it fired after 51 or more (median 66).

Substitute: the official LLaVA code compares CLIP image embeddings with CLIP text
embeddings of the instruction; here both sides are LLM-space (the projected visual
features and the instruction tokens' input embeddings, what the pre-LLM view carries).
"""
from __future__ import annotations

import numpy as np
import torch

from ..contracts import STAGE_PRE_LLM, LayerView, Scorer
from .similarity import compiled, cosine_matrix

# the largest theta whose kernel fits fp32: theta / (1 - theta) <= ln(fp32 max) = 88.72
THETA_OVERFLOW = 88.0 / 89.0
EXHAUSTED = 1e-4   # a gain at most this share of its own item's L_ii is rounding noise


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
    embeddings [T, D]. relevance is the min-max normalised r before the exp
    (instruction_relevance)."""
    similarity, weight, r = _kernel_parts(features, text, theta, negate)
    return similarity.mul_(weight[:, None]).mul_(weight[None, :]), r       # w_i S_ij w_j, in place


def _kernel_parts(features: torch.Tensor, text: torch.Tensor, theta: float, negate: bool,
                  unit_relevance: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S = cosine matrix [N, N], weight w [N], relevance r [N]), fp32: the kernel is
    L_ij = (S_ij w_i) w_j, rounded in that order. The features are normalised once;
    unit_relevance: (normalised features, r) already computed from these features."""
    if unit_relevance is None:
        x = torch.nn.functional.normalize(features.detach().float(), dim=-1)
        r = _relevance(x, text, negate)
    else:
        x, r = unit_relevance
    weight = torch.exp(theta / (2 * (1 - theta)) * r) if theta != 1 else r
    return cosine_matrix(x), weight, r


def conditional_dpp_map(features: torch.Tensor, text: torch.Tensor, n: int, theta: float = 0.5,
                        negate: bool = True,
                        unit_relevance: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.LongTensor:
    """[n] items (pick order): dpp_greedy_map(conditional_kernel(features, text, theta,
    negate)[0], n), the same numbers and picks. On a CPU the kernel is not formed: the greedy
    reads S and w (_dpp_greedy_host with weight), which saves two passes over the N x N
    matrix (only the diagonal and the n picked rows are ever weighted).
    unit_relevance: (normalised features [N, D], relevance [N]) of these very features, when
    the caller has them (CDPrunerScorer.__call__ computed them for the recorded score)."""
    similarity, weight, _ = _kernel_parts(features, text, theta, negate, unit_relevance)
    if similarity.device.type != "cpu":
        return dpp_greedy_map(similarity.mul_(weight[:, None]).mul_(weight[None, :]), n)
    n = min(n, similarity.shape[0])
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return _dpp_greedy_host(similarity, n, weight)


def dpp_greedy_map(kernel: torch.Tensor, n: int) -> torch.LongTensor:
    """[n] distinct items picked by greedy MAP inference of the DPP with kernel [N, N]
    (pick order). gain_i = L_ii - ||c_i||^2 (the squared Cholesky diagonal if i were
    added); ties go to the lower index. Only gains above EXHAUSTED * L_ii of their own
    item count (below: rounding noise); once none is (the kernel's rank is used up), the
    rest are the unpicked items by L_ii, largest first (module docstring), so exactly n
    distinct items come back.

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
    The rank-used-up rule without a branch: the pick is the best gain above its item's
    threshold; once no gain is, `used_up` stays true, the pick is the best unpicked L_ii
    and the update is zero."""
    quality = torch.diagonal(L).clone()                                               # L_ii, [N]
    gain = quality.clone()
    floor = quality.clamp(min=0) * EXHAUSTED                                          # per item (NaN stays NaN)
    unpicked_quality = quality.clone()                                                # -inf once picked
    factors = torch.zeros(n, L.shape[0], dtype=L.dtype, device=L.device)              # rows c_k
    used_up = torch.zeros(1, dtype=torch.bool, device=L.device)
    picks = []
    for k in range(n):
        real = gain > floor                                                           # [N] gains above noise
        best = gain.masked_fill(~real, -float("inf")).argmax(dim=0, keepdim=True)     # [1]
        used_up = used_up | ~real.index_select(0, best)
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


def _dpp_greedy_host(L: torch.Tensor, n: int, weight: torch.Tensor | None = None) -> torch.LongTensor:
    """The same steps on a CPU tensor, compiled (_greedy_steps, numba; no copy of L).
    fp32 like the device loop, whose products may round differently (another order of the
    same sums), so the two are each checked against the determinant greedy and a float64
    replay rather than against each other.

    weight [N] (optional): L is then the unweighted S and the kernel is (S_ij w_i) w_j,
    formed only where the loop reads it (the diagonal, the picked rows): elementwise the
    same roundings as conditional_kernel's in-place products, so the same numbers.

    Speed (1,024 tokens of width 512, 256 picks, one AMD EPYC core, numba 0.68): ~2.3 ms compiled against
    ~4.7 ms for the same steps as numpy calls (each step was ~10 calls of 1-4 us around one
    vector-matrix product). Tried and dropped before (2026-11-29): delayed (blocked) updates
    that form only the picked rows of the kernel; two threads: 17 -> 25 ms."""
    K = L.numpy()
    w = weight.numpy() if weight is not None else np.ones(K.shape[0], dtype=K.dtype)  # x 1.0 is exact
    quality = (np.diagonal(K) * w) * w                                                # L_ii, [N]
    floor = np.maximum(quality, 0) * EXHAUSTED                                         # per item (NaN stays NaN)
    picks = _greedy_steps(K, w, quality, floor, n)[0].tolist()
    if len(picks) < n:                                                                 # rank used up (or NaN)
        picks += _by_quality(quality, picks, n - len(picks))
    return torch.tensor(picks, dtype=torch.long)


@compiled
def _greedy_steps(K, w, quality, floor, n):
    """Greedy MAP steps on the kernel (K_ij w_i) w_j, K [N, N] and w, quality = L_ii,
    floor [N] of one float dtype -> (picks, factors): up to n picks (int64, pick order),
    fewer once no gain is above its item's floor (the caller fills the rest by quality),
    and the factor rows c_k [n, N] (rows past the picks are zero). Each step: the pick is the
    first item with the largest real gain; e = (L_j - sum_t c_tj c_t) / sqrt(gain_j), the
    sum taken t = 0, 1, ... (one rounding per product and per subtraction, no FMA);
    gain_i -= e_i^2. A NaN gain or L_ii is never real."""
    N = K.shape[0]
    gain = quality.copy()
    factors = np.zeros((n, N), K.dtype)                                                # rows c_k
    picks = np.empty(n, np.int64)
    for k in range(n):
        j = -1
        for i in range(N):
            if gain[i] > floor[i] and (j < 0 or gain[i] > gain[j]):
                j = i
        if j < 0:
            return picks[:k], factors
        picks[k] = j
        e = factors[k]
        wj = w[j]
        for i in range(N):
            e[i] = (K[j, i] * wj) * w[i]                                               # row j of the kernel
        for t in range(k):
            c = factors[t, j]
            row = factors[t]
            for i in range(N):
                e[i] -= c * row[i]
        root = np.sqrt(gain[j])
        for i in range(N):
            e[i] /= root
            gain[i] -= e[i] * e[i]
        gain[j] = -np.inf                        # stays -inf: later updates subtract finite numbers
    return picks, factors


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
        if THETA_OVERFLOW < theta < 1:
            # L_ii = exp(theta / (1 - theta) r_i) overflows fp32 at r_i = 1: an inf kernel,
            # every gain inf/NaN, and the "selection" was the first n tokens in index order
            raise ValueError(f"scorer.theta={theta!r} is not allowed: a float in [0, {THETA_OVERFLOW:.4f}] or 1 "
                             "(above that the kernel exp(theta / (1 - theta)) overflows fp32)")
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
