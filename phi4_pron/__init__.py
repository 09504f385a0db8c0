"""phi4-pron: LoRA fine-tuning of Phi-4-multimodal for English pronunciation assessment."""

__version__ = "0.1.0"
