"""HTTP calls to model workers: status, metadata and the `\\0`-framed generation stream."""
