"""contrastive_cli: config-driven self-supervised contrastive representation learning."""

__version__ = "0.1.0"
__all__ = ["load_clip", "load_encoder"]


def __getattr__(name: str):
    # imported on first use: `import contrastive_cli` (the console scripts, the configs) stays light
    if name in ("load_encoder", "load_clip"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'contrastive_cli' has no attribute {name!r}")
