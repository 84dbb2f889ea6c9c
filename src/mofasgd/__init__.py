"""MoFaSGD: Momentum Factorized SGD, a rank-r SVD of the momentum of every weight matrix (plain PyTorch)."""

from mofasgd.optimizer import MoFaSGD
from mofasgd.routing import split_for_mofasgd

__all__ = ["MoFaSGD", "split_for_mofasgd"]
__version__ = "0.1.0"
