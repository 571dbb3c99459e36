"""PhyAssist: fine-tune an LLM into a psychological counselor's assistant, and prove every number."""

__version__ = "0.1.0"
