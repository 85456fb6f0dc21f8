"""spfl_vmap: a secure and privacy-preserving federated-learning simulator that trains all
clients of a round at once with ``torch.func`` (``functional_call`` + ``grad`` + ``vmap``).

Example:
    >>> from spfl_vmap import Config, run
    >>> history = run(Config(dataset="digits", model="lr", comm_round=5))
    >>> history.final["test_acc"]
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import ConfigError, DataError, SpflError  # noqa: E402
from .registry import Registry  # noqa: E402
from .builder import Simulator  # noqa: E402  (imports every module: their config sections register)
from .engine import History  # noqa: E402
from .runner import run  # noqa: E402

__all__ = ["Config", "History", "Simulator", "run", "Registry", "SpflError", "ConfigError", "DataError", "__version__"]
