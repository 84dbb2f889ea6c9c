"""NanoGPT pre-training: compare optimizers for the hidden matrices of a small GPT (see README.md)."""
