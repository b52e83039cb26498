"""Training: pure losses, the one training loop, and one module per stage."""
