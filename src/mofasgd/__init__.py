"""MoFaSGD: Momentum Factorized SGD, a rank-r SVD of the momentum of every weight matrix (plain PyTorch).

The algorithm is specified in docs/algorithm.md. The package is named after the optimizer; the LLaMA-Factory
YAML keys say ``mfsgd`` (``use_mfsgd``, ``mfsgd_rank``, ...) because they keep the names of the authors' fork.

``DEFAULTS`` is the one table of MoFaSGD's options: its constructor's keyword arguments and their defaults. The
LLaMA-Factory keys (``mfsgd_<option>``), the NanoGPT ``hidden`` section and configs/optimizers/mfsgd.yaml are
derived from it or checked against it, and :func:`check_options` validates values with the optimizer's own rules.
"""

import inspect
from types import MappingProxyType
from typing import Any

import torch

from mofasgd.optimizer import _INITS, ADAMW_STATES, MoFaSGD
from mofasgd.routing import split_for_mofasgd

DEFAULTS = MappingProxyType(
    {
        name: parameter.default
        for name, parameter in inspect.signature(MoFaSGD).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
)
INITS: tuple[str, ...] = _INITS  # the accepted values of `init`


def check_options(**options: Any) -> None:
    """Raise MoFaSGD's own ValueError if its constructor would refuse `options` (the others at their defaults).

    Validates without a model: the options are tried on a throwaway 2 x 2 matrix.
    """
    MoFaSGD([torch.zeros(2, 2, requires_grad=True)], **options)


__all__ = ["ADAMW_STATES", "DEFAULTS", "INITS", "MoFaSGD", "check_options", "split_for_mofasgd"]
__version__ = "0.1.0"
