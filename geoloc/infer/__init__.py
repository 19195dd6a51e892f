"""Inference layer: a trained run back as a model, rerank, gallery, calibration, predict."""
