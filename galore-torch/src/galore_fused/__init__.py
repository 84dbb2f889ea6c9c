"""Fused-backward GaLore: galore-torch's GaLoreAdamW with each gradient projected as soon as it is accumulated."""

from galore_fused.optimizer import FusedGaLoreAdamW

__all__ = ["FusedGaLoreAdamW"]
__version__ = "0.1.0"
