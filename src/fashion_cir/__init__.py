"""fashion-cir: composed image retrieval for fashion catalogs."""

__version__ = "0.1.0"
