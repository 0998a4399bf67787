"""Deployment of a trained model: ONNX export, int8 quantisation, vocabulary pruning, parity,
dev metrics and latency (``python -m kdlab.deploy MODEL_DIR OUT_DIR``; :func:`deploy`)."""

from kdlab.deploy.deployment import ParityError, deploy

__all__ = ["ParityError", "deploy"]
