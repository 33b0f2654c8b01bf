"""Prompting: Automatic Prompt Engineer (APE) over the one engine."""
