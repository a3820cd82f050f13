"""BHViT: a binarized hybrid vision transformer in JAX/Flax."""
__version__ = '0.1.0'
