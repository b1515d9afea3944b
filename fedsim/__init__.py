"""fedsim: simulate federated fine-tuning of language models with user-level DP."""

__version__ = "0.1.0"
