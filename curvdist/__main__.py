"""``python -m curvdist``: the ``curvdist`` command."""
from .cli import main

main()
