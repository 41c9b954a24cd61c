"""The method itself: gating per family, the hooks, mixing (λ), the build's gradient step, σ, memories, indexes,
retrieval and the memory builder. Pure torch (and faiss for the indexes): nothing here imports lm-eval, the
benchmark tasks or the experiments."""
