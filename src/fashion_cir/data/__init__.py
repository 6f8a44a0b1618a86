"""Reading datasets: images, FashionIQ-format triplets, the clothing catalog, caption joining."""
