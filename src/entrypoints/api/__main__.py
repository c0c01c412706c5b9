"""`python -m vilaserve.entrypoints.api`: the same as `vilaserve api`."""

from vilaserve.entrypoints.api.main import main

main()
