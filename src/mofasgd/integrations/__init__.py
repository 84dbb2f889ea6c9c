"""Integrations of MoFaSGD with training frameworks; each imports its own framework (``mofasgd`` needs torch only)."""
