"""The Textual face of quant-tutor."""
