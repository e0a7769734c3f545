"""competesmoe: pre-training Mixture-of-Experts language models with CompeteSMoE routing."""
__version__ = "0.1.0"
