from ._model import RMGEModel
from ._module import RMGEModule

__all__ = ["RMGEModel", "RMGEModule"]
