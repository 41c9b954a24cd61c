"""The lm-evaluation-harness integration: the `hf-knnmoe` model, how lm-eval requests become reference
sequences for a build, and pseudo-labels for unlabelled reference sets."""
