"""dsal-tf: label-efficient medical image segmentation with Keras 3 / TensorFlow."""

__version__ = "0.1.0"
