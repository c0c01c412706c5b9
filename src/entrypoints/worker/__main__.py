"""`python -m vilaserve.entrypoints.worker`: the same as `vilaserve worker`."""

from vilaserve.entrypoints.worker.main import main

main()
