"""The public API as a user calls it, for the static type check (``mypy``; see ``[tool.mypy]`` in pyproject.toml).

Nothing here runs in the test suite: the imports are for the type checker only
and the calls sit in a function that is never called. ``mypy`` checks them
against dropgeom's annotations with ``disallow_untyped_calls``, so every public
function used here must be fully typed, and a changed public signature or
return type shows up as a type error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:  # nothing is imported at run time: a renamed API fails mypy, not test collection
    import torch
    from torch import Tensor, nn

    import dropgeom
    from dropgeom import (
        CurvatureOperator,
        CurvatureResult,
        Dataset,
        ExponentialFamily,
        FisherKind,
        History,
        ModelManifold,
        Objective,
        Structure,
        embedding_curvature,
        get_family,
        load_dataset,
        make_objective,
        normal_curvature,
        statistical_curvature,
    )
    from dropgeom.dropout import (
        DropoutTerms,
        GapResult,
        MaskEnumeration,
        MixtureResult,
        enumerate_masks,
        find_dropout,
        forward_with_masks,
        gap,
        mixture,
        PenaltyResult,
        penalty,
        sample_masks,
        terms,
    )
    from dropgeom._fisher import fisher
    from dropgeom.operators import conjugate_gradient
    from dropgeom.train import classification_metrics, evaluate, train


def _use_public_api() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    gen = torch.Generator().manual_seed(0)

    fam: ExponentialFamily = get_family("categorical")
    mu: Tensor = fam.mean(net(x))
    m = ModelManifold(net, x, fam)
    jv: Tensor = m.jvp(torch.zeros(m.num_params, dtype=torch.float64))

    F: CurvatureOperator = fisher(m, kind=FisherKind.EXACT, structure=Structure.DIAG)
    F_mc: CurvatureOperator = fisher(m, kind="mc", structure="kfac", n_samples=4, generator=gen)
    d: Tensor = F.diag() + F_mc.diag()
    sol: Tensor = conjugate_gradient(lambda v: F.mv(v), d)

    res: CurvatureResult = embedding_curvature(m, alpha=1.0, method="dense", damping=1e-3)
    kappa: Tensor = normal_curvature(m, torch.ones(m.num_params, dtype=torch.float64))
    one = ModelManifold(nn.Linear(1, 1, bias=False).double(), x[:, :1], "gaussian")
    g2: Tensor = statistical_curvature(one)

    layers: Dict[str, nn.Module] = find_dropout(net)
    masks: Dict[str, Tensor] = sample_masks(net, x, noise="bernoulli", generator=gen)
    enum: MaskEnumeration = enumerate_masks(net, x)
    out: Tensor = forward_with_masks(net, x, masks)
    r: GapResult = gap(net, x, y, family="categorical", method="exact")
    t: DropoutTerms = terms(net, x, y, family="categorical")
    pen: PenaltyResult = penalty(net, x, y, family="categorical", form="quadratic", method="mc", generator=gen)
    pen_value: Tensor = pen.value
    mix: MixtureResult = mixture(net, x, y, alpha=0.5, method="mc", n_samples=16, generator=gen)

    obj: Objective = make_objective("fisher_dropout", p=0.2)
    data: Dataset = load_dataset("glm_teacher", n=64)
    hist: History = train(net, data, obj, epochs=1, progress=False)
    metrics: Dict[str, float] = evaluate(net, x, y) | classification_metrics(net(x), y)

    del mu, jv, sol, res, kappa, g2, layers, enum, out, r, t, pen, pen_value, mix, hist, metrics
    assert dropgeom.__version__
