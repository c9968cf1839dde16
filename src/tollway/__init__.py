"""tollway — a crypto-native pay-per-call gateway for OpenAI-compatible LLM APIs."""

__version__ = "0.1.0"
