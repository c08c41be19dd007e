"""betadiff: beta diffusion (Zhou, Chen, Wang, Zheng, NeurIPS 2023) in PyTorch.

Public API (imported lazily so `import betadiff` stays light):
    load_config(path, overrides) -> TrainConfig
    train(cfg, report=callback, run_dir=None, resume=True) -> dict[str, float]
    load_model(checkpoint) -> Model ;  generate(model, denoiser, n, generator) -> dict
Math modules: betadiff.process, betadiff.losses, betadiff.sampling, betadiff.gaussian.
"""

__version__ = "0.1.0"

_API = {
    "load_config": "config", "TrainConfig": "config", "ConfigError": "config",
    "train": "train", "load_model": "train", "generate": "train", "NonFiniteLossError": "train",
}


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'betadiff' has no attribute {name!r}")


__all__ = sorted(_API)
