"""Pure analyzers: each takes a Checkpoint (or a mapping of tensor entries) and returns frozen data."""
