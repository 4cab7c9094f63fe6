# Hydra config package (shipped inside the wheel as contrastive_cli.configs).
