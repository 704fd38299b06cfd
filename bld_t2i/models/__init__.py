"""Networks: the binary autoencoder and the denoising transformer."""
