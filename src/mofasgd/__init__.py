"""MoFaSGD: Momentum Factorized SGD, a rank-r SVD of the momentum of every weight matrix (plain PyTorch).

The algorithm is specified in docs/algorithm.md. The package is named after the optimizer; the LLaMA-Factory
YAML keys say ``mfsgd`` (``use_mfsgd``, ``mfsgd_rank``, ...) because they keep the names of the authors' fork.

:mod:`mofasgd.options` is the one table of MoFaSGD's options (``OPTIONS``; ``DEFAULTS`` their defaults): the
constructor, the LLaMA-Factory keys (``mfsgd_<option>``), the NanoGPT ``hidden`` section and
configs/optimizers/mfsgd.yaml are derived from it or checked against it, and :func:`validate` checks values and
the rules between them and of each engine, raising :class:`OptionError` (its ``.option`` names the option).
"""

from mofasgd.optimizer import MoFaSGD
from mofasgd.options import ADAMW_STATES, DEFAULTS, INITS, OPTIONS, OptionError, validate
from mofasgd.routing import split_for_mofasgd

__all__ = [
    "ADAMW_STATES",
    "DEFAULTS",
    "INITS",
    "OPTIONS",
    "MoFaSGD",
    "OptionError",
    "split_for_mofasgd",
    "validate",
]
__version__ = "0.1.0"
