"""contrastive_cli: config-driven self-supervised contrastive representation learning."""

__version__ = "0.1.0"
__all__ = ["load_encoder"]


def __getattr__(name: str):
    # imported on first use: `import contrastive_cli` (the console scripts, the configs) stays light
    if name == "load_encoder":
        from .api import load_encoder

        return load_encoder
    raise AttributeError(f"module 'contrastive_cli' has no attribute {name!r}")
