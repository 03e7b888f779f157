"""Data: token corpora and the random-block batch sampler (imported lazily: they need torch)."""


def __getattr__(name):
    if name in ("CharCorpus", "SyntheticTokens", "embedded_corpus_text"):
        from ds_hydra.data import corpus

        return getattr(corpus, name)
    if name == "RandomBlocks":
        from ds_hydra.data.batches import RandomBlocks

        return RandomBlocks
    raise AttributeError(name)


__all__ = ["CharCorpus", "SyntheticTokens", "RandomBlocks", "embedded_corpus_text"]
