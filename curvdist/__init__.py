"""curvdist: layer-wise curvature exponents and spectral alignment, from one process to a Ray cluster.

    result = curvdist.analyze(model, data, loss="cross_entropy", top_k=20)   # in-process
    con = curvdist.open("out/quickstart")                                    # DuckDB views of a run's dataset
    curvdist.fit.fit_exponents(sigma, h)                                     # exponents of one layer
"""
__version__ = "0.1.0"

from curvdist.analyze import Result, analyze
from curvdist.math import fit

__all__ = ["Result", "__version__", "analyze", "fit", "open"]


def open(out):
    """A DuckDB connection over the dataset in ``out`` with views ``runs``, ``layers``, ``directions``, ``spectra``
    (imported lazily: the in-process API needs neither DuckDB nor Ray)."""
    from curvdist.io.query import open as _open

    return _open(out)
