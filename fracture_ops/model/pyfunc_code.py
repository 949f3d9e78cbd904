"""The classifier's MLflow model as code (MLflow "models from code").

``package`` logs this file as the pyfunc's ``python_model``: MLflow stores the file itself, not a
cloudpickle of an object, and loading the model runs this file, which builds the
:class:`~fracture_ops.model.pyfunc.FractureClassifier` from the installed package. So
loading a model from the registry runs no pickled code; the weights are read with
``torch.load(weights_only=True)`` (:mod:`fracture_ops.model.checkpoint`).
"""

import mlflow

from fracture_ops.model.pyfunc import FractureClassifier

mlflow.models.set_model(FractureClassifier())
