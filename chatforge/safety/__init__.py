"""Content filters on prompts and outputs: PII redaction, block-lists, a trainable classifier."""
