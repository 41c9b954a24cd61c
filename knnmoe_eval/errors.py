"""One exception type for every bad input we detect, so callers (and tests) can catch ours and nothing else."""


class KnnMoeError(ValueError):
    """A memory, option or model that kNN-MoE cannot use; the message says what is wrong and how to fix it."""
