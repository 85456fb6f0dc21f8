"""spfl_vmap: a secure and privacy-preserving federated-learning simulator that trains all
clients of a round at once with ``torch.func`` (``functional_call`` + ``grad`` + ``vmap``).

Example:
    >>> from spfl_vmap import Config, run
    >>> history = run(Config(dataset="digits", model="lr", comm_round=5))
    >>> history.final["test_acc"]
"""

__version__ = "0.1.0"

from .config import Config
from .engine import History, Simulator, run
from .errors import ConfigError, DataError, SpflError
from .registry import Registry

__all__ = ["Config", "History", "Simulator", "run", "Registry", "SpflError", "ConfigError", "DataError", "__version__"]
