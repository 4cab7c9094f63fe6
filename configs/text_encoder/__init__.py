# Hydra config package: the text towers of the image-text methods (CLIP, SigLIP)
