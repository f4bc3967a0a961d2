"""MLflow "model from code" entry point of the store model (see feda2v.tracking.pyfunc).

MLflow copies this file into the model directory and runs it at load time, so the logged model
holds no pickle: its parts are this code and a safetensors checkpoint.
"""
from mlflow.models import set_model

from feda2v.tracking.pyfunc import StoreModel

set_model(StoreModel())
