"""The worker's engine: continuous batching over a model runner.

A step is schedule (scheduler.py) -> execute (the `ModelRunner` port) -> update (scheduler.py),
driven by engine.py; `EngineTextGenerator` (text_generator.py) puts the `TextGenerator` port in
front of it so the use cases do not change.
"""
