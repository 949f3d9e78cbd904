"""The model's contract, shared by training, evaluation, inference, explain, detection and monitoring.

- :mod:`~fracture_ops.model.network`: the network factory (timm backbones), Grad-CAM layers, device.
- :mod:`~fracture_ops.model.preprocess`: what every image goes through before the network.
- :mod:`~fracture_ops.model.outputs`: task kinds, label/logit column names, the predictions table
  and the one decision rule.
- :mod:`~fracture_ops.model.documents`: the calibration and thresholds documents.
- :mod:`~fracture_ops.model.calibrators`: temperature and isotonic calibration.
- :mod:`~fracture_ops.model.checkpoint`: safe weights loading.
- :mod:`~fracture_ops.model.pyfunc` (+ ``pyfunc_code``): the packaged MLflow model.
- :mod:`~fracture_ops.model.prediction_log`: the prediction log's layout and schema.

Stages depend on this package, never on each other (checked by ``lint-imports``).
"""
