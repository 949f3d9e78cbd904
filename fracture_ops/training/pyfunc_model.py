"""Where the classifier's pyfunc lived before :mod:`fracture_ops.model.pyfunc`.

Models packaged by earlier releases store a model-code file that imports this module; it stays so
that ``mlflow.pyfunc.load_model`` still loads them. New code imports :mod:`fracture_ops.model.pyfunc`.
"""

from fracture_ops.model.pyfunc import FractureClassifier, load_classifier_dir

__all__ = ["FractureClassifier", "load_classifier_dir"]
