"""The RMGE model: the scvi-tools model class, its module, training plan and data module."""

from ._model import RMGEModel
from ._module import RMGEModule
from ._trainingplan import RMGEDataSplitter, RMGETrainingPlan

__all__ = ["RMGEModel", "RMGEModule", "RMGETrainingPlan", "RMGEDataSplitter"]
