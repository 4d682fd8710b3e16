"""srmoa-dist: a distributed store of frozen LoRA experts behind a frozen LLM."""
__version__ = "0.1.0"
