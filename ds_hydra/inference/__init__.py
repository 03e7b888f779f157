"""Inference from a trained run: sampling (``generate``: ``task=infer``), evaluation (``evaluate``: ``task=eval``),
export as a Hugging Face directory (``export_hf``: ``task=export_hf``), loading (``loading``), and the
``inference`` group's schema (``config``)."""


def run_inference(cfg, run_dir=None):
    """``task=infer``: sample, or evaluate with ``inference.mode=eval``."""
    if getattr(cfg.inference.mode, "value", cfg.inference.mode) == "eval":
        from ds_hydra.inference.evaluate import evaluate

        return evaluate(cfg, run_dir)
    from ds_hydra.inference.generate import infer

    return infer(cfg, run_dir)
