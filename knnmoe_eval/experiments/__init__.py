"""The paper's experiments in one command (`python -m knnmoe_eval.experiments`): Table 1 and the ablations of
§6 through lm-eval, with the SFT baselines, significance tests and the offline toy MoE."""
