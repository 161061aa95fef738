"""The numbers of `cdiff eval`, as pure functions on feature arrays (numpy, float64).

Everything here takes plain arrays of features ([n, d], one row per image or text) and returns plain
floats, so each formula can be checked by hand:

- `clip_score`: CLIPScore (Hessel et al. 2021) as used by Custom Diffusion's text alignment,
  2.5 * max(cos(image_i, text_i), 0), averaged over the pairs.
- `mean_cosine`: image alignment, the mean cosine similarity over every (generated, target) pair.
- `kid`: Kernel Inception Distance (Binkowski et al. 2018), the unbiased estimator of the squared
  MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, on whatever features are given;
  `paired=True` for same-seed samples (see `mmd2_unbiased`).
"""

from __future__ import annotations

import numpy as np

CLIP_SCORE_WEIGHT = 2.5
EPS = 1e-12


def as_features(x) -> np.ndarray:
    """A [n, d] float64 array from a list of vectors, a numpy array or a torch tensor."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {a.shape}")
    return a


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    a = as_features(x)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, EPS)


def cosine_matrix(a, b) -> np.ndarray:
    """[n, m] cosine similarities between the rows of `a` and the rows of `b`."""
    a, b = normalize(a), normalize(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return a @ b.T


def pairwise_cosine(a, b) -> np.ndarray:
    """[n] cosine similarity of row i of `a` with row i of `b`."""
    a, b = normalize(a), normalize(b)
    if a.shape != b.shape:
        raise ValueError(f"paired features must have the same shape: {a.shape} vs {b.shape}")
    return np.sum(a * b, axis=1)


def clip_scores(image_features, text_features, weight: float = CLIP_SCORE_WEIGHT) -> np.ndarray:
    """Per-pair CLIPScore: weight * max(cos(image_i, text_i), 0)."""
    return weight * np.maximum(pairwise_cosine(image_features, text_features), 0.0)


def clip_score(image_features, text_features, weight: float = CLIP_SCORE_WEIGHT) -> float:
    """Mean CLIPScore over (image_i, text_i) pairs: the paper's text alignment."""
    s = clip_scores(image_features, text_features, weight)
    if s.size == 0:
        raise ValueError("clip_score needs at least one image")
    return float(s.mean())


def mean_cosine(a, b) -> float:
    """Mean cosine similarity over every pair (row of `a`, row of `b`): the paper's image alignment."""
    m = cosine_matrix(a, b)
    if m.size == 0:
        raise ValueError("mean_cosine needs at least one vector on each side")
    return float(m.mean())


def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma * x.y + coef0)^degree with gamma = 1/d by default (KID's kernel)."""
    x, y = as_features(x), as_features(y)
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, *, paired: bool = False) -> float:
    """Unbiased squared MMD between samples x [m, d] and y [n, d] with KID's polynomial kernel.

    Independent samples (the KID paper's estimator):
        1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)

    `paired=True` is for samples drawn in pairs (x_i and y_i from the same seed, so m == n): the cross
    term then leaves out the matched pairs, - 2/(m(m-1)) sum_{i!=j} k(x_i, y_j), the U-statistic of
    Gretton et al. (2012, eq. 3), which stays unbiased however alike x_i and y_i are (with the
    independent formula two identical sets score -2/m (mean k(x_i, x_i) - mean k(x_i, x_j)) < 0;
    with this one exactly 0).

    Either can be slightly negative for close distributions (they are unbiased, not clamped)."""
    x, y = as_features(x), as_features(y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("KID needs at least two samples on each side")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} vs {y.shape[1]}")
    if paired and m != n:
        raise ValueError(f"paired samples must be as many on each side: {m} vs {n}")
    kxx = polynomial_kernel(x, x, degree)
    kyy = polynomial_kernel(y, y, degree)
    kxy = polynomial_kernel(x, y, degree)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    sxy = (kxy.sum() - np.trace(kxy)) / (m * (m - 1)) if paired else kxy.mean()
    return float(sxx + syy - 2.0 * sxy)


def kid(x, y, *, paired: bool = False, subset_size: int | None = None, subsets: int = 100, seed: int = 0) -> float:
    """KID: the unbiased MMD^2 above, on the full sets, or averaged over random subsets of
    `subset_size` rows per side (the usual practice for thousands of images) when both sets are larger.
    Multiply by 1000 for the usual "KID x 10^3" unit."""
    x, y = as_features(x), as_features(y)
    if subset_size is None or subset_size >= min(x.shape[0], y.shape[0]):
        return mmd2_unbiased(x, y, paired=paired)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        ix = rng.choice(x.shape[0], subset_size, replace=False)
        iy = ix if paired else rng.choice(y.shape[0], subset_size, replace=False)
        vals.append(mmd2_unbiased(x[ix], y[iy], paired=paired))
    return float(np.mean(vals))
