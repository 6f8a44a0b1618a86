"""Static feature cache: encode images once, reuse everywhere."""
