"""logitfusion: decode-time fine-tuning of a large language model by small experts (proxy-tuning, EFT, DLF)."""

__version__ = "0.1.0"
