"""The file a logged model runs when it loads (MLflow's "models from code"): it names the model's class.

Every model this pipeline logs carries a copy of this file instead of a pickled Python object, so loading one runs
these lines and unpickles nothing, as checkpoints are read as tensors only. The class itself is imported from the
installed project (pipeline.serving).
"""

import mlflow

from pipeline.serving import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
