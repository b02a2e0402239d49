"""The option sets of dropgeom: one documented ``str, Enum`` per choice (theory.md section 1).

Every public function, the config file and the command line take their choices
from these enums, so a new member is one line here and shows up everywhere. Each
enum is a ``str`` subclass: ``Structure.DIAG == "diag"``, so plain strings keep
working wherever a member is accepted, and :func:`parse` turns either into the
member with one uniform error message.

Example:
    >>> from dropgeom.options import Structure, parse
    >>> parse(Structure, "DIAG")
    <Structure.DIAG: 'diag'>
    >>> Structure.DIAG == "diag"
    True
    >>> parse(Structure, "full")
    Traceback (most recent call last):
    ...
    ValueError: unknown structure 'full'; choose one of ['dense', 'diag', 'layer', 'kfac', 'implicit']
"""

from __future__ import annotations

from enum import Enum
from typing import List, Type, TypeVar, Union

__all__ = [
    "FisherKind",
    "Structure",
    "Reduction",
    "PenaltyForm",
    "Estimator",
    "Noise",
    "Method",
    "CurvatureMethod",
    "TangentSolver",
    "ExecutorKind",
    "MallocMode",
    "VerdictLabel",
    "parse",
    "choices",
]

E = TypeVar("E", bound=Enum)


class _Choice(str, Enum):
    """Base of the option enums: prints as its value, so messages and records read ``diag``, not ``Structure.DIAG``."""

    def __str__(self) -> str:
        return str(self.value)


class FisherKind(_Choice):
    """Which Fisher information (theory.md section 2)."""

    EXACT = "exact"
    """``(1/n) sum_i J_i^T Sigma_i J_i``: the Fisher information of the model; equals the GGN of the NLL."""
    MC = "mc"
    """Monte Carlo Fisher: labels sampled from the model; unbiased for ``exact``."""
    EMPIRICAL = "empirical"
    """Empirical Fisher from observed labels (``targets=``); biased, equals ``exact`` only at a perfect fit."""


class Structure(_Choice):
    """How the ``[P, P]`` Fisher is represented (theory.md section 2)."""

    DENSE = "dense"
    """The full matrix; exact, ``O(P^2)`` memory."""
    DIAG = "diag"
    """The exact diagonal of the chosen kind."""
    LAYER = "layer"
    """Exact per-module blocks (block-diagonal)."""
    KFAC = "kfac"
    """Kronecker factors for Linear and Conv layers (KFAC / KFC "expand"), exact blocks for other modules."""
    IMPLICIT = "implicit"
    """Matrix-free products through jvp/vjp; exact; ``O(P + nK)`` memory."""


class Reduction(_Choice):
    """Scaling over the ``n`` inputs."""

    MEAN = "mean"
    """``(1/n) sum_i``: the per-sample Fisher (default)."""
    SUM = "sum"
    """``sum_i = n * mean``: the Fisher of all ``n`` observations together."""


class PenaltyForm(_Choice):
    """Which deterministic replacement of dropout the penalty computes (theory.md section 4.4)."""

    QUADRATIC = "quadratic"
    """``(1/2) V sum_j F^mask_jj``: the Fisher quadratic form of the mask noise."""
    DIVERGENCE = "divergence"
    """``p sum_j KL(p || p^(-j))``: the first-order (divergence) term of the Bernoulli gap."""


class Estimator(_Choice):
    """How the penalty's sum over output classes and units is evaluated (theory.md section 4.4)."""

    EXACT = "exact"
    """Every class (covariance-root column) and every unit; deterministic."""
    MC = "mc"
    """Sampled labels from the model (one Rademacher-weighted column per draw); unbiased."""
    UNIT = "unit"
    """Sampled labels and one sampled unit per layer; unbiased, cheapest."""


class Noise(_Choice):
    """The law of the dropout masks (theory.md section 4.1)."""

    BERNOULLI = "bernoulli"
    """``m_j ~ Bernoulli(1-p) / (1-p)``: standard (inverted) dropout."""
    GAUSSIAN = "gaussian"
    """``m_j ~ N(1, p/(1-p))``: Gaussian dropout with the same variance."""
    DROPCONNECT = "dropconnect"
    """Bernoulli masks on the weights of Linear layers instead of their inputs."""


class Method(_Choice):
    """Exact enumeration or Monte Carlo, for the mask averages (gap, terms, mixture; theory.md section 4)."""

    EXACT = "exact"
    """Enumerate every mask (small layers only); deterministic."""
    MC = "mc"
    """Average over sampled masks, with a standard error."""


class CurvatureMethod(_Choice):
    """How the embedding curvature is computed (theory.md section 3)."""

    DENSE = "dense"
    """Form the Hessian of eta and the pseudo-inverse metric; exact, at most a few thousand parameters."""
    STOCHASTIC = "stochastic"
    """Random pairs, matrix-free, with a standard error; exact linear algebra where the whitened Jacobian or its
    Gram matrix fits, conjugate gradients beyond (:class:`TangentSolver`)."""


class TangentSolver(_Choice):
    """The linear algebra of the stochastic embedding-curvature estimator: its tangent projections and sampling
    solves (theory.md section 3; ``CurvatureResult.solver``)."""

    SVD = "svd"
    """Thin SVD of the whitened Jacobian ``S^T J`` in memory; exact."""
    GRAM = "gram"
    """Eigendecomposition of the ``nR x nR`` Gram matrix ``S^T J J^T S`` from Jacobian products; exact up to a
    relative cutoff, any number of parameters."""
    CG = "cg"
    """Conjugate gradients on ``g = J^T S S^T J``; iterative, capped (beyond the Gram limit, and for inputs
    streamed over batches)."""


class ExecutorKind(_Choice):
    """Which executor runs the units of a sweep."""

    PROCESS = "process"
    """Spawned worker processes on this machine (default)."""
    RAY = "ray"
    """Ray tasks, on a local Ray or on a cluster (``--address``)."""


class MallocMode(_Choice):
    """How glibc's ``malloc`` treats large freed blocks in every ``dropgeom`` command and ``reproduce``'s workers
    (``DROPGEOM_MALLOC``; dropgeom.allocator)."""

    HEAP = "heap"
    """Freed blocks stay in the heap and are reused: faster for large tensors, at several times the memory."""
    SYSTEM = "system"
    """glibc's defaults: blocks above the mmap threshold are mapped afresh and unmapped when freed (default)."""


class VerdictLabel(_Choice):
    """The verdict a claim can get; each rule states in advance which data give which label."""

    SUPPORTED = "supported"
    """The pre-stated rule's evidence holds, significant after correction, on every measure the rule names."""
    NOT_SUPPORTED = "not supported"
    """The evidence the rule asks for is absent, though the data could have shown it."""
    REFUTED = "refuted"
    """A significant effect opposite to the claim, on every measure the rule names."""
    MEASURE_DEPENDENT = "measure-dependent"
    """Invariant measures disagree in sign (significantly): the answer depends on how flatness is measured."""
    INCONCLUSIVE = "inconclusive"
    """Nothing significant either way, too little data, an absence the data cannot bound (no equivalence), or
    significant effects in both directions across settings (the evidence then says *setting-dependent*)."""


def choices(cls: Type[E]) -> List[str]:
    """The values of an option enum, in definition order (for ``argparse`` choices and messages).

    Raises:
        Nothing of its own; a ``cls`` that is not an Enum class fails as iterating it or reading ``.value`` does.

    Example:
        >>> choices(Reduction)
        ['mean', 'sum']
    """
    return [str(m.value) for m in cls]


def _what(cls: Type[Enum]) -> str:
    """'PenaltyForm' -> 'penalty form', the enum's name in words for messages."""
    name = cls.__name__
    words = [c if not c.isupper() else " " + c.lower() for c in name]
    return "".join(words).strip()


def parse(cls: Type[E], value: Union[str, E], what: str = "", where: str = "") -> E:
    """The member of ``cls`` named by ``value`` (a member, or its value in any case).

    ``what`` names the option in the message (default: the enum's name in words);
    ``where`` prefixes it with the function that checks it.

    Raises:
        ValueError: ``value`` is not a member or value of ``cls``; the message lists the choices.

    Example:
        >>> parse(Noise, "Gaussian")
        <Noise.GAUSSIAN: 'gaussian'>
        >>> parse(Method, "sampled", where="gap")
        Traceback (most recent call last):
        ...
        ValueError: gap: unknown method 'sampled'; choose one of ['exact', 'mc']
    """
    if isinstance(value, cls):
        return value
    raw = value.value if isinstance(value, Enum) else value
    try:
        return cls(str(raw).lower() if isinstance(raw, str) else raw)
    except ValueError:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}unknown {what or _what(cls)} {value!r}; choose one of {choices(cls)}") from None
