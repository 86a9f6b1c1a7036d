"""curvdist: layer-wise curvature exponents and spectral alignment, from one process to a Ray cluster.

    result = curvdist.analyze(model, data, loss="cross_entropy", top_k=20)   # in-process
    con = curvdist.open("out/quickstart")                                    # DuckDB views of a run's dataset
    curvdist.fit.fit_exponents(sigma, h)                                     # exponents of one layer
"""
__version__ = "0.1.0"

from . import fit  # noqa: E402
from .analyze import Result, analyze  # noqa: E402
from .store import open  # noqa: E402,A004

__all__ = ["Result", "analyze", "fit", "open", "__version__"]
