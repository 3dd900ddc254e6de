"""Fit the task-specific Hessian R and write the searchable index.

    python index.py --corpus RUN/corpus --queries RUN/queries --out RUN/index

R = λ·R_eval + (1−λ)·R_train, where R_train is the second moment of a seeded sample of corpus
vectors g(m) and R_eval that of the query vectors g(q). The index holds every corpus vector as
Ḡ(m) = (R + δI)^(-1/2) g(m) / ||·||, and records what query.py must apply to a query vector so
that score(m, q) = Ḡ(m) · Ḡ(q). With --damping auto (the default) R_train is first shrunk toward its
scaled identity by the Ledoit–Wolf weight estimated from the sample (≈ 0 when the sample is much
larger than d): on the demo's sweep this keeps attribution stable at any sample size, where a plain
small δ collapses when the sample holds about d vectors. Without --queries, R = R_train (a corpus
with no query set yet). Outputs, in RUN/index:

    hessian.h5     λ, k, the spectra of R_train, R_eval and R + δI, R^(-1/2) (and TRAK's R^(-1)), settings
    spectrum.png   the sorted spectra of λ·R_eval and (1−λ)·R_train, crossing marked
    index.h5       `G` (N x d: every Ḡ(m)), `ids`, `query_transform`; written last, so it exists only whole

Each HDF5 file also records its provenance (ts.provenance: command line, versions, commit, host, time), which
nothing compares.

Under torchrun (`torchrun --nproc_per_node W index.py ...`) rank r writes the corpus chunks i ≡ r (mod W)
into share-0000r-of-0000W.h5 (`G`, `ids`), and index.h5 holds the settings, `query_transform` and the
build every share must carry, but no rows. R, the index rows and query.py's results equal one process's
bit for bit (on the CPU, at one thread per process as torchrun gives each rank).

The rows of the ablation table are flag combinations:

    dot product          --hessian none --no-unit-norm --uncorrected
    cosine               --hessian none --uncorrected
    TRAK-like            --trak --uncorrected      (documents as they are; queries times R_train^(-1))
    + optimizer corr.    --hessian none
    + R_train            --hessian train
    + R_eval             --hessian eval
    TrackStar            (defaults: --hessian mixed --lam auto --damping auto)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.linalg
import torch
import typer
from tqdm import tqdm

import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)


class Hessian(str, Enum):
    mixed = "mixed"
    train = "train"
    eval = "eval"
    none = "none"




def vector_dataset(meta: ts.RunSettings, uncorrected: bool, run: Path) -> str:
    """Which chunk dataset holds the vectors this index is built from."""
    if not uncorrected:
        return "vectors"
    if "vectors_uncorrected" in meta.datasets:
        return "vectors_uncorrected"
    if meta.correction == "none":
        return "vectors"  # encoded without correction: `vectors` already is the uncorrected projection
    raise ts.TrackStarError(f"{run} has no uncorrected vectors (encode with --also-uncorrected) for --uncorrected")


def read_runs(corpus: Path, queries: Path | None, uncorrected: bool
              ) -> tuple[ts.RunSettings, ts.RunSettings | None, str]:
    """The two runs' metadata, refusing a pair that was not encoded the same way (no queries: None)."""
    cmeta = ts.read_meta(corpus)
    if queries is None:
        return cmeta, None, vector_dataset(cmeta, uncorrected, corpus)
    qmeta = ts.read_meta(queries)
    for run, meta, kind in ((corpus, cmeta, "corpus"), (queries, qmeta, "queries")):
        if meta.kind != kind:
            raise ts.TrackStarError(f"--{kind} {run} holds an encoded {meta.kind!r} run, not {kind!r}")
    ts.check_same(cmeta, qmeta, ts.COMPATIBLE_KEYS, f"corpus run {corpus}", f"queries run {queries}")
    dataset = vector_dataset(cmeta, uncorrected, corpus)
    if dataset != vector_dataset(qmeta, uncorrected, queries):
        raise ts.TrackStarError(f"{corpus} and {queries} differ in which vectors are uncorrected")
    return cmeta, qmeta, dataset


# ----------------------------------------------------------------------------------------------
# Second moments of projected gradients, their spectra, λ and R^(-1/2).


def sample_blocks(run: str | Path, dataset: str, n_sample: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded uniform sample of `n_sample` rows (without replacement), chunk by chunk.

    The sample is drawn over row positions in chunk order, so it depends only on (seed, chunk sizes);
    only the sampled rows are read, and memory is bounded by one chunk's sample.
    """
    sizes = ts.chunk_lengths(ts.read_meta(run))
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(n_sample, total), replace=False))
    starts = np.cumsum([0] + sizes)
    for f, lo, hi in zip(ts.chunk_files(run), starts[:-1], starts[1:], strict=True):
        local = picked[(picked >= lo) & (picked < hi)] - lo
        if len(local):
            with h5py.File(f, "r") as h:
                yield ts.chunk_rows(h, dataset, local)  # h5py reads an increasing row list as one selection


def gathered(blocks: Iterable[np.ndarray], rows: int = 4096) -> Iterator[np.ndarray]:
    """The rows of `blocks`, in order, regrouped into blocks of at least `rows` (the last may be smaller):
    each accumulator update streams the whole d x d matrix, so a chunk's few sampled rows are batched."""
    pending, n = [], 0
    for x in blocks:
        pending.append(x)
        n += len(x)
        if n >= rows:
            yield np.concatenate(pending)
            pending, n = [], 0
    if pending:
        yield np.concatenate(pending)


def second_moment_matrix(blocks: Iterable[np.ndarray], device: str = "cpu") -> tuple[np.ndarray, int, float]:
    """(XᵀX / n, n, Σ‖x‖⁴): the uncentred second moment of all rows of `blocks`, accumulated in float64,
    with what Ledoit–Wolf shrinkage needs besides it (the sum of squared squared norms).

    Uncentred, as the paper's autocorrelation: the mean gradient direction is exactly what the
    correction should down-weight (it is shared by all examples).
    """
    acc, n, norm4 = None, 0, 0.0
    for x in gathered(blocks):
        x = torch.as_tensor(x, device=device).double()
        acc = x.T @ x if acc is None else acc.addmm_(x.T, x)
        n += x.shape[0]
        norm4 += float((x * x).sum(dim=1).square().sum())
    if acc is None or n == 0:
        raise ts.TrackStarError("no vectors to estimate a second moment from")
    return acc.div_(n).cpu().numpy(), n, norm4


def ledoit_wolf(S: np.ndarray, n: int, norm4: float) -> tuple[np.ndarray, float]:
    """(ρ·μI + (1−ρ)·S, ρ): S = XᵀX/n shrunk toward the scaled identity μI, μ = trace(S)/d, in S's memory.

    Ledoit & Wolf (2004), for an uncentred second moment: ρ = min(β², δ²)/δ² with
    δ² = ‖S − μI‖²/d, how far S is from the identity, and β² = (Σ‖x‖⁴/n − ‖S‖²)/(n·d), how noisy
    S is as an estimate from n samples (Σ_i ‖x_i x_iᵀ − S‖² = Σ_i ‖x_i‖⁴ − n‖S‖², so one pass suffices).
    With n ≫ d, ρ → 0 and S stands; with n < d the estimate is rank-deficient and ρ pulls it toward μI,
    so whitening does not blow up the directions the sample never saw.
    """
    d = S.shape[0]
    mu = float(np.trace(S)) / d
    frob2 = float(S.ravel() @ S.ravel())  # a dot product: no d x d temporary
    delta2 = (frob2 - d * mu * mu) / d
    beta2 = (norm4 / n - frob2) / (n * d)
    rho = 0.0 if delta2 <= 0 else float(np.clip(min(beta2, delta2) / delta2, 0.0, 1.0))
    S *= 1.0 - rho
    S[np.diag_indices(d)] += rho * mu
    return S, rho


def _eigh_threads(d: int) -> int | None:
    """CPU threads for a d x d eigendecomposition. Small ones run on one thread: there MKL's solver
    synchronises its threads so often that on shared cores two threads took 1 s where one took 1 ms
    (d = 128, measured on a 2-core AMD EPYC); from d ~ 512 up, threads pay off again."""
    return 1 if d <= 512 else None


def spectrum(R: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Eigenvalues of a symmetric matrix, float64, sorted descending."""
    with ts.cpu_threads(_eigh_threads(R.shape[0])):
        return torch.linalg.eigvalsh(torch.as_tensor(R, device=device).double()).flip(0).cpu().numpy()


def numerical_rank(eigenvalues: np.ndarray) -> int:
    """How many eigenvalues are above float64 round-off of the largest (LAPACK's usual threshold)."""
    top = float(np.max(eigenvalues, initial=0.0))
    return int(np.sum(eigenvalues > top * len(eigenvalues) * np.finfo(np.float64).eps))


def crossing_component(dim: int, e_train: np.ndarray, e_eval: np.ndarray) -> tuple[int, int]:
    """(k, k_target): the component where λ·R_eval and (1−λ)·R_train should cross.

    The paper crosses at about the 1000th of 65,536 components; we scale that with d. R_eval has
    rank at most n_queries (and R_train at most the sample size), past which its eigenvalues are
    round-off, so k is clipped below both numerical ranks.
    """
    k_target = round(1000 * dim / 65536)
    limit = min(numerical_rank(e_train), numerical_rank(e_eval))
    if limit == 0:
        raise ts.TrackStarError("R_train or R_eval is zero: all vectors are zero?")
    return min(k_target, limit - 1), k_target


def mix_lambda(e_train: np.ndarray, e_eval: np.ndarray, k: int) -> float:
    """λ with λ·e_eval[k] = (1−λ)·e_train[k]: the two scaled spectra cross at component k."""
    a, b = float(e_train[k]), float(e_eval[k])
    if a + b <= 0:
        raise ts.TrackStarError(f"both spectra are zero at component {k}; give --lam explicitly")
    return a / (a + b)


# At d = 2^16 one d x d float64 matrix is 34 GB, so R is built in place: R_train and R_eval are the only two
# matrices this code allocates; the mix, the damping and R^(-1/2) reuse their memory. The eigenvectors take
# a third: on the CPU they come from LAPACK's MRRR solver (dsyevr, through SciPy), whose workspace is O(d),
# where divide and conquer (dsyevd, behind torch.linalg.eigh and numpy) allocates 2·d² besides (4 matrices,
# measured). The eigenvalue-only spectra work on one copy. Peak: about 3 matrices
# (`python -m bench.indexing --r-memory`).


def mixed_hessian(R_train: np.ndarray, R_eval: np.ndarray | None, lam: float) -> np.ndarray:
    """R = λ·R_eval + (1−λ)·R_train in R_train's memory (λ=1: R_eval itself). R_eval is overwritten."""
    if lam == 0.0 or R_eval is None:
        return R_train
    if lam == 1.0:
        return R_eval
    R_train *= 1.0 - lam
    R_eval *= lam
    R_train += R_eval
    return R_train


def damp(R: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """(R + δI, δ) in R's memory, δ = damping · trace(R)/d: relative to the mean eigenvalue, so the same
    --damping means the same thing at any gradient scale."""
    delta = damping * float(np.trace(R)) / R.shape[0]
    R[np.diag_indices(R.shape[0])] += delta
    return R, delta


def inverse_roots(R: np.ndarray, spare: np.ndarray | None = None, inverse: bool = False, device: str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(R^(-1/2), R^(-1) if `inverse`, eigenvalues of R descending) by a float64 eigendecomposition R = VΛVᵀ.

    R^(-1/2) = WWᵀ with W = VΛ^(-1/4): V is scaled in place, never copied. R's memory is overwritten (on the
    CPU the solver destroys it) and then holds R^(-1/2); R^(-1) takes the memory of `spare`, a d x d float64
    matrix the caller no longer needs (None: allocated). R must be positive definite.
    """
    if torch.device(device).type != "cpu":
        return _inverse_roots_torch(R, inverse, device)
    # R is symmetric, so its transpose (a Fortran-order view) is R itself: LAPACK then works in R's memory.
    w, V = scipy.linalg.eigh(R.T, overwrite_a=True, check_finite=False, driver="evr")
    _check_positive(float(w.min()))
    V *= w**-0.25
    r, v = torch.from_numpy(R), torch.from_numpy(V)
    with ts.cpu_threads(_eigh_threads(R.shape[0])):
        torch.matmul(v, v.mT, out=r)
        del V, v  # before R^(-1): at most three d x d matrices at once
        other = None
        if inverse:  # TRAK's R^(-1) = R^(-1/2)·R^(-1/2)
            other = torch.from_numpy(spare) if spare is not None else torch.empty_like(r)
            torch.matmul(r, r, out=other)
    return R, None if other is None else other.numpy(), w[::-1].copy()


def _inverse_roots_torch(R: np.ndarray, inverse: bool, device: str) -> tuple[np.ndarray, np.ndarray | None,
                                                                                np.ndarray]:
    """inverse_roots on a GPU: torch's eigh (cuSOLVER) in device memory, in float64."""
    r = torch.as_tensor(R, dtype=torch.float64, device=device)
    w, V = torch.linalg.eigh(r)
    _check_positive(w.min().item())
    V.mul_(w.pow(-0.25))
    torch.matmul(V, V.mT, out=r)
    other = torch.matmul(r, r) if inverse else None
    return r.cpu().numpy(), None if other is None else other.cpu().numpy(), w.flip(0).cpu().numpy()


def _check_positive(smallest: float) -> None:
    if smallest <= 0:
        raise ts.TrackStarError(f"R is not positive definite (smallest eigenvalue {smallest:.3g}); use --damping > 0")


def inverse_sqrt(R: np.ndarray, device: str = "cpu") -> np.ndarray:
    """R^(-1/2), symmetric, float64, in R's memory."""
    return inverse_roots(R, device=device)[0]


# ----------------------------------------------------------------------------------------------
# The Hessian: R_train, R_eval, λ, damping, the transforms for documents and queries.


# Below this relative damping R_train is shrunk by Ledoit–Wolf (`--damping auto`); the mix then gets this
# much on its diagonal, so R stays positive definite when λ = 1 (R_eval alone, rank <= the number of queries).
AUTO_DAMPING = 1e-3


@dataclasses.dataclass(frozen=True)
class HessianOptions:
    """How R is fitted: the index.py options that change it."""

    hessian: str  # mixed | train | eval | none
    lam: str = "auto"  # "auto" or a number in [0, 1] as given
    trak: bool = False  # queries times (R_train + δI)^(-1), documents untransformed
    damping: str = "auto"  # "auto" (Ledoit–Wolf, then AUTO_DAMPING) or a number as given
    train_sample: int = 100000
    sample_seed: int = 0


@dataclasses.dataclass
class HessianFit:
    """The fitted R: λ, where the spectra cross, damping, spectra, and the transforms (None: identity)."""

    corpus_transform: np.ndarray | None = None
    query_transform: np.ndarray | None = None
    lam: float | None = None
    lam_source: str | None = None
    k: int | None = None  # the component where λ·R_eval and (1−λ)·R_train cross
    k_target: int | None = None
    k_clipped: bool = False
    shrinkage: float = 0.0  # Ledoit–Wolf weight on R_train
    delta: float = 0.0  # δ added to R's diagonal
    n_train: int = 0
    n_eval: int = 0
    e_train: np.ndarray | None = None  # spectra, descending
    e_eval: np.ndarray | None = None
    e_R: np.ndarray | None = None
    inverse_sqrt: np.ndarray | None = None

    def summary(self) -> dict:
        """The scalars hessian.h5 and index.h5 record as settings."""
        return {k: getattr(self, k) for k in ("lam", "lam_source", "k", "k_target", "k_clipped", "delta", "n_train",
                                              "n_eval", "shrinkage")}


def fit_hessian(corpus: Path, queries: Path | None, dataset: str, opts: HessianOptions, device: str) -> HessianFit:
    """R from a seeded sample of the corpus run and (when given) the queries run."""
    if opts.hessian == "none":
        return HessianFit()
    train = second_moment_matrix(sample_blocks(corpus, dataset, opts.train_sample, opts.sample_seed), device)
    R_eval, n_eval = None, 0
    if queries is not None:
        R_eval, n_eval, _ = second_moment_matrix((x for _, x in ts.iter_vector_blocks(queries, dataset)), device)
    return hessian_from_moments(train, R_eval, n_eval, opts, device)


def hessian_from_moments(train: tuple[np.ndarray, int, float], R_eval: np.ndarray | None, n_eval: int,
                         opts: HessianOptions, device: str = "cpu") -> HessianFit:
    """R from its two estimates: shrink R_train (damping auto), choose λ, mix, damp, take R^(-1/2).

    `train` is second_moment_matrix's (R_train, n, Σ‖x‖⁴). Without queries (R_eval None) R is
    R_train alone: the paper's Hessian for a task with no query set. Both matrices are overwritten:
    their memory holds R, then R^(-1/2) and R's eigenvectors (or TRAK's R^(-1)).
    """
    R_train, n_train, norm4 = train
    shrinkage = 0.0
    if opts.damping == "auto":
        R_train, shrinkage = ledoit_wolf(R_train, n_train, norm4)
    e_train = spectrum(R_train, device)
    e_eval, k, k_target = None, None, None
    if R_eval is not None:
        e_eval = spectrum(R_eval, device)
        k, k_target = crossing_component(R_train.shape[0], e_train, e_eval)
    if opts.hessian == "mixed":
        lam = mix_lambda(e_train, e_eval, k) if opts.lam == "auto" else float(opts.lam)
    else:
        lam = 0.0 if opts.hessian == "train" else 1.0
    damping = AUTO_DAMPING if opts.damping == "auto" else float(opts.damping)
    R, delta = damp(mixed_hessian(R_train, R_eval, lam), damping)
    spare = R_eval if R is R_train else R_train
    # TRAK: g(m)ᵀ R_train^(-1) g(q); documents stay as they are, queries carry the inverse
    inv_sqrt, inverse, e_R = inverse_roots(R, spare, opts.trak, device)
    query_transform = inverse if opts.trak else inv_sqrt
    return HessianFit(
        corpus_transform=None if opts.trak else inv_sqrt, query_transform=query_transform, lam=lam,
        lam_source=("auto" if opts.lam == "auto" else "given") if opts.hessian == "mixed" else opts.hessian,
        k=k, k_target=k_target, k_clipped=k != k_target, shrinkage=shrinkage, delta=delta, n_train=n_train,
        n_eval=n_eval, e_train=e_train, e_eval=e_eval, e_R=e_R, inverse_sqrt=inv_sqrt)


def write_hessian(path: Path, fit: HessianFit, settings: dict) -> None:
    with ts.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in ("e_train", "e_eval", "e_R"):
            if getattr(fit, key) is not None:
                f.create_dataset(key, data=getattr(fit, key))
        if fit.inverse_sqrt is not None:
            f.create_dataset("inverse_sqrt", data=fit.inverse_sqrt.astype(np.float32))
        if fit.query_transform is not None and fit.query_transform is not fit.inverse_sqrt:
            f.create_dataset("query_transform", data=fit.query_transform.astype(np.float32))  # TRAK's R^(-1)
        ts.write_attrs(f, {**settings, "provenance": ts.provenance()})


def plot_spectrum(path: Path, fit: HessianFit, hessian_kind: str) -> None:
    """Log-log sorted spectra of λ·R_eval and (1−λ)·R_train; they cross at the marked component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = fit.lam
    mixed = hessian_kind == "mixed" and 0 < lam < 1
    w_eval, w_train = (lam, 1 - lam) if mixed else (1.0, 1.0)  # unscaled when one side has weight 0
    x = np.arange(1, len(fit.e_train) + 1)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for e, w, name in ((fit.e_eval, w_eval, "R_eval"), (fit.e_train, w_train, "R_train")):
        if e is None:  # no queries: R_train alone
            continue
        y = np.where(x <= numerical_rank(e), w * e, np.nan)  # past its rank a spectrum is round-off
        ax.loglog(x, y, label=f"{w:.3g}·{name}" if mixed else name)
    if mixed:
        k = fit.k
        ax.plot([k + 1], [(1 - lam) * fit.e_train[k]], "ko", label=f"crossing: component {k + 1}")
    ax.set(xlabel="component (sorted)", ylabel="eigenvalue",
           title=f"hessian={hessian_kind}, λ={lam:.4g}" + (" (k clipped by rank)" if fit.k_clipped else ""))
    ax.legend()
    fig.tight_layout()
    with ts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The index: the corpus streamed through the transform, in blocks.


def storage_scale(corpus: Path, dataset: str, fit: HessianFit, unit_norm: bool, dtype: str, opts: HessianOptions,
                  device: str) -> float:
    """A power of two the stored vectors are divided by (and queries multiplied by).

    Unit vectors fit float16 as they are. Raw gradients can exceed float16's range (65504) or sink
    into its subnormals; scaling by a power of two is exact and changes no ranking, so we put the
    sample's largest entry near 2^8, leaving 2^8 of headroom for rows outside the sample.
    """
    if unit_norm or dtype == "float32":
        return 1.0
    matrix = _device_matrix(fit.corpus_transform, device)
    peak = 0.0
    for x in sample_blocks(corpus, dataset, opts.train_sample, opts.sample_seed):
        y = ts.transform(torch.as_tensor(x, device=device), matrix, False)
        peak = max(peak, float(y.abs().max()))
    return 2.0 ** round(math.log2(peak / 256)) if peak > 0 else 1.0


def _device_matrix(m: np.ndarray | None, device: str) -> torch.Tensor | None:
    return None if m is None else torch.as_tensor(m, dtype=torch.float32, device=device)


def write_index(path: Path, corpus: Path, matrix: torch.Tensor | None, attrs: dict, block: int, device: str,
                query_transform: np.ndarray | None = None, shard: int = 0, num_shards: int = 1) -> None:
    """Stream corpus chunks shard, shard + num_shards, ... (all by default) through the transform into a
    contiguous dataset `G`, with their `ids`.

    Contiguous and uncompressed, so query.py's scan reads a block as one plain copy. `attrs` (what the
    file records) says which vectors, whether unit-normalised, the storage dtype and scale. Each chunk is
    transformed on its own, `block` rows at a time, so every row meets the same matrix-product shapes
    whichever share it lands in (a float32 GEMM's rows depend on its shape).
    """
    dataset, unit_norm, scale, dtype = attrs["vector_dataset"], attrs["unit_norm"], attrs["scale"], attrs["dtype"]
    n = sum(ts.chunk_lengths(ts.read_meta(corpus))[shard::num_shards])
    with ts.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        vectors = f.create_dataset("G", shape=(n, attrs["corpus"]["dim"]), dtype=dtype)
        ids = f.create_dataset("ids", shape=(n,), dtype=np.int64)
        if query_transform is not None:
            f.create_dataset("query_transform", data=query_transform.astype(np.float32))
        ts.write_attrs(f, {**attrs, "provenance": ts.provenance()})
        pos = 0
        with tqdm(total=n, desc="index" if num_shards == 1 else f"index share {shard}/{num_shards}", unit="doc",
                  unit_scale=True) as bar:
            for chunk_ids, x in ts.iter_vector_blocks(corpus, dataset, shard, num_shards):
                ts.check_finite(x, f"{corpus} ({dataset})")
                for lo in range(0, len(x), block):
                    y = ts.transform(torch.as_tensor(x[lo : lo + block], device=device), matrix, unit_norm)
                    y = (y / scale).to(getattr(torch, dtype)).cpu()
                    if not bool(torch.isfinite(y).all()):
                        raise ts.TrackStarError(f"index vectors overflow {dtype}; use --dtype float32")
                    vectors[pos : pos + len(y)] = y.numpy()
                    ids[pos : pos + len(y)] = chunk_ids[lo : lo + block]
                    pos += len(y)
                    bar.update(len(y))


# ----------------------------------------------------------------------------------------------
# Under torchrun. Rank 0 fits R exactly as one process does (the same sample, read by the same calls, the
# same float64 accumulation order) and hands every rank the corpus transform; each rank transforms its own
# chunks. Why not split the Gram XᵀX across ranks: an all-reduce of partial sums re-associates the float64
# additions (R equal to one process's only to rounding), and the sample Gram is n·d² flops, serial anyway
# for exactness, small beside the per-row transform and the scan, which are what ranks share out. Rank 0
# reads the sampled rows itself (the corpus run is on a filesystem every rank sees): the same bytes a
# gather over the network would bring it, with no code of its own.

OWN = ("hessian.h5", "spectrum.png", "index.h5", "share-*-of-*.h5")  # what an index directory may hold


def broadcast(obj: Any, rank: int) -> Any:
    """Rank 0's `obj` (anything picklable), on every rank."""
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def index_directory(out: Path, rank: int, world: int) -> Iterator[Path]:
    """The directory every rank writes into: rank 0's ts.atomic_directory beside `out`, swapped in whole
    when rank 0 leaves it, after every share is written; a build that fails on any rank (torchrun then
    ends them all) leaves the previous index as it was, and the next build clears the leftovers."""
    if rank != 0:
        yield Path(broadcast(None, rank))
        return
    with ts.atomic_directory(out, OWN) as tmp:
        if world > 1:
            broadcast(str(tmp), rank)
        yield tmp


def shared_transform(matrix: torch.Tensor | None, attrs: dict | None, rank: int, world: int
                     ) -> tuple[torch.Tensor | None, dict]:
    """Rank 0's corpus transform (float32, on the CPU) and index attributes, on every rank."""
    if world == 1:
        return matrix, attrs
    shape = broadcast(None if matrix is None else tuple(matrix.shape), rank)
    attrs = broadcast(attrs, rank)
    if shape is None:
        return None, attrs
    matrix = matrix if rank == 0 else torch.empty(shape, dtype=torch.float32)
    # A tensor, not a pickle (at d = 2^16 it is 17 GB), in pieces of 256 MiB: no message is huge.
    for piece in matrix.split(max(1, 2**26 // shape[1])):
        torch.distributed.broadcast(piece, src=0)
    return matrix, attrs


def write_manifest(path: Path, attrs: dict, query_transform: np.ndarray | None) -> None:
    """index.h5 of a sharded index: the settings and `query_transform`, no rows (they are in the shares)."""
    with ts.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if query_transform is not None:
            f.create_dataset("query_transform", data=query_transform.astype(np.float32))
        ts.write_attrs(f, {**attrs, "provenance": ts.provenance()})


def parse_damping(text: str) -> str:
    """"auto", or a finite number >= 0 (kept as its text, so settings record what the user gave)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ts.TrackStarError(f"--damping must be auto or a finite number >= 0, got {text!r}")
    return repr(value)


@app.command(help=__doc__.replace("\n\n    ", "\n\n\b\n    "))  # \b: click keeps those lines as written
def main(
    corpus: Path = typer.Option(..., help="Encoded corpus run directory (encode.py corpus --out)."),
    queries: Path | None = typer.Option(None, help="Encoded queries run directory; its vectors give R_eval. "
                                        "Without it R = R_train (the index for a corpus with no query set yet)."),
    out: Path = typer.Option(..., help="Index directory to write (hessian.h5, spectrum.png, index.h5; "
                                          "under torchrun, share-*-of-*.h5 too)."),
    hessian: Hessian = typer.Option(Hessian.mixed, help="R: mixed (λ·R_eval + (1−λ)·R_train), train (λ=0), "
                                    "eval (λ=1), or none (identity: no Hessian correction)."),
    lam: str = typer.Option("auto", help="λ for --hessian mixed: a number in [0, 1], or auto (spectra cross "
                            "at component round(1000·d/65536), clipped below the ranks of R_eval and R_train)."),
    no_unit_norm: bool = typer.Option(False, "--no-unit-norm", help="Keep G(z) unnormalised (dot-product rows)."),
    uncorrected: bool = typer.Option(False, "--uncorrected", help="Use the vectors without optimizer correction "
                                     "(dataset vectors_uncorrected; encode with --also-uncorrected)."),
    trak: bool = typer.Option(False, "--trak", help="TRAK-like row: documents untransformed, queries times "
                              "(R_train + δI)^(-1), no unit norm. Implies --hessian train."),
    dtype: str = typer.Option("float16", help="Storage dtype of the index vectors: float16 | float32."),
    train_sample: int = typer.Option(100000, help="Corpus vectors sampled (seeded, uniform) for R_train."),
    sample_seed: int = typer.Option(0, help="Seed of the R_train sample."),
    damping: str = typer.Option("auto", help="δ = damping · trace(R)/d is added to R's diagonal before "
                                "R^(-1/2) (relative to the mean eigenvalue); auto: R_train is first shrunk toward "
                                f"a scaled identity by its Ledoit–Wolf weight, then δ at {AUTO_DAMPING:g}."),
    block: int = typer.Option(8192, help="Corpus rows transformed at a time (bounds memory)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one)."),
    show_example: bool = typer.Option(False, help="End by printing a query.py command line for this index."),
) -> None:
    hessian_kind = hessian.value
    if trak:
        if hessian_kind not in ("mixed", "train"):  # mixed is the default: --trak alone means train
            raise ts.TrackStarError(f"--trak uses R_train; it cannot be combined with --hessian {hessian_kind}")
        hessian_kind, no_unit_norm = "train", True
    if lam != "auto":
        try:
            value = float(lam)
        except ValueError:
            raise ts.TrackStarError(f"--lam must be auto or a number in [0, 1], got {lam!r}") from None
        if not 0 <= value <= 1:
            raise ts.TrackStarError(f"--lam must lie in [0, 1], got {value}")
        if hessian_kind != "mixed":
            raise ts.TrackStarError(f"--lam applies to --hessian mixed only (got --hessian {hessian_kind})")
    if dtype not in ("float16", "float32"):
        raise ts.TrackStarError(f"--dtype must be float16 or float32, got {dtype!r}")
    damping = parse_damping(damping)
    if train_sample < 1 or block < 1:
        raise ts.TrackStarError("--train-sample and --block must be >= 1")
    rank, world = ts.distributed()
    if queries is None and hessian_kind in ("mixed", "eval"):
        if hessian_kind == "eval" or lam != "auto":
            raise ts.TrackStarError(f"--hessian {hessian_kind}{' --lam ' + lam if lam != 'auto' else ''} needs R_eval: "
                                    "give --queries RUN/queries")
        hessian_kind = "train"  # the task-specific mix needs queries; without them the paper whitens by R_train alone
        if rank == 0:
            typer.echo("no --queries: R = R_train (no task-specific R_eval); refit with --queries once you have them")
    out = ts.check_output(out, "index", [corpus, queries])
    cmeta, qmeta, dataset = read_runs(corpus, queries, uncorrected)
    device = ts.pick_device(device)
    opts = HessianOptions(hessian_kind, lam, trak, damping, train_sample, sample_seed)
    # Built beside --out and swapped in whole: a failed rerun leaves the previous index as it was.
    with index_directory(out, rank, world) as tmp:
        fit, matrix, attrs = HessianFit(), None, None
        if rank == 0:
            fit, attrs = fit_and_record(tmp, corpus, cmeta, queries, qmeta, dataset, uncorrected, opts,
                                        not no_unit_norm, dtype, device)
            if fit.corpus_transform is not None:
                matrix = torch.as_tensor(fit.corpus_transform, dtype=torch.float32)
            # drawn at random for each build: every file of the index records it, and a reader that opens them
            # one after another refuses a file of another build (ts.open_index_file)
            attrs["build"] = ts.new_build_id()
            if world > 1:  # every share records the build, so index.h5 never names another build's share
                attrs["shares"] = {"count": world, "build": attrs["build"]}
        matrix, attrs = shared_transform(matrix, attrs, rank, world)
        matrix = None if matrix is None else matrix.to(device)
        if world == 1:
            write_index(tmp / "index.h5", corpus, matrix, attrs, block, device, fit.query_transform)
        else:
            write_index(tmp / ts.share_name(rank, world), corpus, matrix, {**attrs, "share": rank}, block, device,
                        shard=rank, num_shards=world)
            torch.distributed.barrier()  # every share is whole before index.h5 names them
            if rank == 0:
                write_manifest(tmp / "index.h5", attrs, fit.query_transform)
                ts.index_segments(tmp, cmeta, attrs["shares"])  # each share checked as query.py will
    if rank == 0:
        shares = f", {world} shares" if world > 1 else ""
        typer.echo(f"wrote {out / 'index.h5'} ({cmeta.n_examples} documents, d={cmeta.dim}, {dtype}{shares})")
        if show_example:
            print_example(out, cmeta.data)


def fit_and_record(tmp: Path, corpus: Path, cmeta: ts.RunSettings, queries: Path | None, qmeta: ts.RunSettings | None,
                   dataset: str, uncorrected: bool, opts: HessianOptions, unit_norm: bool, dtype: str, device: str
                   ) -> tuple[HessianFit, dict]:
    """R fitted and written (hessian.h5, spectrum.png), and the attributes the index files record."""
    hessian_kind = opts.hessian
    fit = fit_hessian(corpus, queries, dataset, opts, device)
    settings = {"hessian": hessian_kind, "lam": fit.lam, "unit_norm": unit_norm, "uncorrected": uncorrected,
                "trak": opts.trak, "dtype": dtype, "train_sample": opts.train_sample, "sample_seed": opts.sample_seed,
                "damping": opts.damping, "vector_dataset": dataset, "corpus_run": str(corpus.resolve()),
                "queries_run": str(queries.resolve()) if queries else None,
                "corpus_side": "identity" if hessian_kind == "none" or opts.trak else "(R + δI)^(-1/2)",
                "query_side": "identity" if hessian_kind == "none" else
                              "(R_train + δI)^(-1)" if opts.trak else "(R + δI)^(-1/2)"}
    if hessian_kind != "none":
        settings.update(fit.summary())
    write_hessian(tmp / "hessian.h5", fit, {**settings, "tool": f"trackstar {ts.VERSION}"})
    if hessian_kind != "none":
        plot_spectrum(tmp / "spectrum.png", fit, hessian_kind)
        typer.echo(f"R: hessian={hessian_kind} λ={fit.lam:.4g} (k={fit.k}, target {fit.k_target}"
                   f"{', clipped by rank' if fit.k_clipped else ''}) δ={fit.delta:.3g}, "
                   f"shrinkage={fit.shrinkage:.3g}, "
                   f"R_train from {fit.n_train} corpus vectors, R_eval from {fit.n_eval} queries")

    if hessian_kind in ("mixed", "train") and fit.n_train < cmeta.dim:
        typer.echo(f"warning: R_train comes from {fit.n_train} vectors in d={cmeta.dim} dimensions, so it is "
                   "rank-deficient and whitening by it over-fits the sample (documents turn near-orthogonal). "
                   "Sample at least d vectors (--train-sample, more documents), lower d, or raise --damping "
                   "(e.g. 0.1-1).", err=True)
    scale = storage_scale(corpus, dataset, fit, unit_norm, dtype, opts, device)
    # The corpus run's settings travel with the index, so query.py checks a queries run against them.
    attrs = {"kind": "index", "corpus": dataclasses.asdict(cmeta), "index": settings, "unit_norm": unit_norm,
             "vector_dataset": dataset, "scale": scale, "dtype": dtype, "queries_data": qmeta.data if qmeta else None}
    return fit, attrs


def print_example(out: Path, corpus_data: str) -> None:
    """How to ask the new index a question, with a prompt cut from the corpus's first document."""
    words = next(ts.iter_records(corpus_data, "corpus"))["text"].split()[:12]
    n = max(1, len(words) - 1)
    prompt, target = " ".join(words[:n]), " " + (words[n] if n < len(words) else words[0])
    typer.echo(f"Ask it a question (the answer's tokens carry the loss):\n  python query.py --index {out} "
               f"--prompt {json.dumps(prompt)} --target {json.dumps(target)}")


if __name__ == "__main__":
    ts.run_cli(app)
