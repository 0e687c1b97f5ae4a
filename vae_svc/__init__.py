"""VAE stage: decodes latents with the checkpoint's VAE and encodes PNG (and, for video, MP4)."""
