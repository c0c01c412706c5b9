"""The API's way to worker replicas deployed as a Ray Serve application: the model directory and
the worker gateway over a deployment handle (fleet.py), which replica a conversation goes to
(affinity.py), and the Ray Serve request router that sends it there (request_router.py, the
only module here that imports Ray)."""
