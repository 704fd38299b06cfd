"""bld_t2i: distributed text-to-image training with Binary Latent Diffusion."""

__version__ = "0.1.0"
