"""Refuse `python setup.py ...`: install with `pip install -e .` (the build is configured in pyproject.toml).

Only a pip install (hatchling) ships the `llamafactory_mfsgd_startup.pth` start-up hook that activates the
extension in LLaMA-Factory; setuptools would install the packages without it.
"""

import sys

sys.exit(
    "llama-factory-mfsgd is not installed through setup.py: `python setup.py install/develop` would skip the "
    "start-up hook (llamafactory_mfsgd_startup.pth) that activates MoFaSGD in LLaMA-Factory.\n"
    "Install with pip instead:  pip install -e .   (editable; or `pip install .`)"
)
