"""Stacked parameters, vectorized local training, the reference loop, and the round loop."""

from .runner import History, run
from .simulator import Simulator

__all__ = ["History", "Simulator", "run"]
