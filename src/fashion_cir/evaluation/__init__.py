"""FashionIQ-protocol evaluation."""
