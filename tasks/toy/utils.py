"""Data loading for the knnmoe_toy tasks: everything lives in knnmoe_eval.experiments.toy; this file is what `!function` sees."""

from knnmoe_eval.experiments.toy import hf_dataset


def load_toy(**kwargs):
    return hf_dataset(**kwargs)
