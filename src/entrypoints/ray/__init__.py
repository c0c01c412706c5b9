"""The workers as a Ray Serve application: the replica deployment and the importable application
builder (app.py), the options both modes share (options.py), what a replica loads (worker.py),
and `vilaserve serve --ray` (runner.py, replica_states.py)."""
