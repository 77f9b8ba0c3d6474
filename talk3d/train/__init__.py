"""Training of Talk3D's deltaplane predictor and super-resolution (``python -m talk3d.train``)."""
from .config import LossWeights, TrainConfig, demo_config, load_config
from .trainer import Trainer, build_model, load_talking_head

__all__ = ["LossWeights", "TrainConfig", "Trainer", "build_model", "demo_config", "load_config", "load_talking_head"]
