"""curvdist: layer-wise curvature exponents and spectral alignment, from one process to a Ray cluster."""
__version__ = "0.1.0"
