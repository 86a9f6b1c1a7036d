"""curvdist.math.rowcache: projections replayed from the statistics pass's rows equal those of a second pass
(float64, every fisher kind, a layer called twice, padding rows, sketched factors' Ritz products), no second pass
runs when the rows are held, and a cache over its budget falls back to the pass."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from curvdist.math import layers as L
from curvdist.math.collect import collect_projections, collect_statistics
from curvdist.math.rowcache import RowCache
from test_factors import gpt2   # the same one-block GPT-2 in float64

DT = torch.float64


class Twice(nn.Module):
    """A layer called twice per forward (shared weights: two input and two error blocks per micro-batch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(6, 6, dtype=DT), nn.Linear(6, 4, dtype=DT)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.body(x)))))


def directions(mods, K=3):
    g = torch.Generator().manual_seed(7)
    return {n: (torch.randn(K, L.shape(m)[0], generator=g, dtype=DT), torch.randn(K, L.shape(m)[1], generator=g,
                                                                                    dtype=DT))
            for n, m in mods.items()}


def case(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "twice":
        net = Twice()
        data = [(torch.randn(b, 6, generator=g, dtype=DT), torch.randint(0, 4, (b,), generator=g)) for b in (5, 3)]
        return net, data, {"body": net.body, "head": net.head}
    net = gpt2()
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    y = torch.where(mask.bool(), ids.roll(-1, 1), torch.full_like(ids, -100))
    return net, [({"input_ids": ids, "attention_mask": mask}, y), ({"input_ids": ids[:1]}, y[:1])], \
        {n: m for n, m in net.named_modules() if L.is_supported(m)}


def fields(p):
    return {k: v for k, v in vars(p).items() if v is not None}


@pytest.mark.parametrize("kind,fisher", [("twice", "empirical"), ("twice", "mc"), ("twice", "type2"),
                                         ("gpt2", "empirical"), ("gpt2", "mc")])
def test_replayed_rows_equal_a_second_pass(kind, fisher):
    net, data, mods = case(kind)
    dirs = directions(mods)
    kw = {"fisher": fisher, "layers": mods, "stat_dtype": DT, "mc_samples": 2, "seed": 5}
    cache = RowCache(2 ** 24)
    collect_statistics(net, data, "cross_entropy", row_cache=cache, **kw)
    assert cache.complete and cache.nbytes > 0
    # no second pass: the data is an exhausted iterator, which the pass would reject as empty
    replayed = collect_projections(net, iter(()), "cross_entropy", directions=dirs, rows=cache, **kw)
    second = collect_projections(net, data, "cross_entropy", directions=dirs, **kw)
    assert set(replayed) == set(second) == set(mods)
    for name in mods:
        got, want = fields(replayed[name]), fields(second[name])
        assert set(got) == set(want) == {"rayleigh_delta", "rayleigh_A", "h_sop"}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-15)
        assert (got["h_sop"] > 0).all()


def test_ritz_products_of_sketched_factors_replayed():
    net, data, mods = case("twice")
    dirs = directions(mods, K=2)
    g = torch.Generator().manual_seed(11)
    bases = {"body": {"A": torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=DT))[0],
                      "delta": torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=DT))[0]}}
    kw = {"fisher": "empirical", "layers": mods, "stat_dtype": DT, "directions": dirs, "bases": bases}
    cache = RowCache(2 ** 24)
    collect_statistics(net, data, "cross_entropy", layers=mods, stat_dtype=DT, row_cache=cache)
    replayed = collect_projections(net, [], "cross_entropy", rows=cache, **kw)["body"]
    second = collect_projections(net, data, "cross_entropy", **kw)["body"]
    for key in ("lambda_A", "lambda_delta", "lambda_A_err", "lambda_delta_err", "h_sop"):
        torch.testing.assert_close(getattr(replayed, key), getattr(second, key), rtol=1e-12, atol=1e-15)


def test_over_budget_the_cache_empties_and_the_pass_runs():
    net, data, mods = case("twice")
    dirs = directions(mods)
    cache = RowCache(500)      # a few rows fit, the batch does not
    collect_statistics(net, data, "cross_entropy", layers=mods, stat_dtype=DT, row_cache=cache)
    assert cache.overflowed and not cache.complete and cache.nbytes == 0 and not cache.inputs
    with pytest.raises(RuntimeError, match="over its budget"):
        cache.replay(None)
    with pytest.raises(ValueError, match="data is empty"):    # so the fallback really is a second pass
        collect_projections(net, [], "cross_entropy", layers=mods, directions=dirs, stat_dtype=DT, rows=cache)
    got = collect_projections(net, data, "cross_entropy", layers=mods, directions=dirs, stat_dtype=DT, rows=cache)
    assert (got["head"].h_sop > 0).all()
