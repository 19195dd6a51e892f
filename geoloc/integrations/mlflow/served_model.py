"""What MLflow runs to load the `geoloc` model ("models from code"): the model is this code and
the packed run folder, never a pickled object, so loading it runs nothing but geoloc itself."""

from mlflow.models import set_model

from geoloc.integrations.mlflow.pyfunc_model import GeolocModel

set_model(GeolocModel())
