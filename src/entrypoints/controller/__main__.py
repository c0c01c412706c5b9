"""`python -m vilaserve.entrypoints.controller`: the same as `vilaserve controller`."""

from vilaserve.entrypoints.controller.main import main

main()
