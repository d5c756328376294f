"""FLEx: personalized federated learning for Mixture-of-Experts LLMs via expert grafting."""

__version__ = "0.1.0"
