"""llmkd.models."""
