"""Fused ops: each a triad of PyTorch reference, Triton kernel and one registered torch.library op."""
