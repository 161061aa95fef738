"""cdiff: teach a text-to-image diffusion model new concepts with Custom Diffusion."""

__version__ = "0.1.0"
