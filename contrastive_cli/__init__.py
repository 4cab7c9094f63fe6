"""contrastive_cli: config-driven self-supervised contrastive representation learning."""

__version__ = "0.1.0"
