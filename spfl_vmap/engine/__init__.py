"""Stacked parameters, vectorized local training, the reference loop, and the round loop.

The engine imports the stage protocols (``spfl_vmap.stages``) and no module package; the
Simulator with every module is ``spfl_vmap.builder.Simulator`` (exported as ``spfl_vmap.Simulator``).
"""

from .local import LocalResult, Trainer, VmapTrainer
from .loop import LoopTrainer
from .simulator import CHECKPOINT, History, RoundLoop

__all__ = ["CHECKPOINT", "History", "LocalResult", "LoopTrainer", "RoundLoop", "Trainer", "VmapTrainer"]
