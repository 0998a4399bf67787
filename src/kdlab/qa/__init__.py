"""Extractive question answering (SQuAD v1.1 / v2.0): post-processing and official metrics."""
