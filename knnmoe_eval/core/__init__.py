"""The method itself: gating per family, the hooks, mixing (λ), the build's gradient step, σ, memories, indexes,
retrieval and the memory builder. Torch, with safetensors for the files and faiss for the indexes; nothing here
imports lm-eval, the benchmark tasks or the experiments."""
