"""chatforge: a complete ChatGPT-style system, from raw text to a chat service."""

__version__ = "0.1.0"
