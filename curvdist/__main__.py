"""``python -m curvdist``: the ``curvdist`` command."""
from curvdist.cli import main

main()
