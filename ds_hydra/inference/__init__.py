"""Inference from a trained run: sampling (``generate``), evaluation (``evaluate``), loading (``loading``)."""


def run_inference(cfg, run_dir=None):
    """``task=infer``: sample, or evaluate with ``inference.mode=eval``."""
    if getattr(cfg.inference.mode, "value", cfg.inference.mode) == "eval":
        from ds_hydra.inference.evaluate import evaluate

        return evaluate(cfg, run_dir)
    from ds_hydra.inference.generate import infer

    return infer(cfg, run_dir)
