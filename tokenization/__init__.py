"""Item tokenization: text embedding and residual k-means on Ray, producing semantic IDs."""
