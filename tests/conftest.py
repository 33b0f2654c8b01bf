"""Hypothesis runs new random examples on every developer run (that is how it finds bugs), but CI (CI=true)
replays a fixed pseudo-random set, so a landing is not decided by which examples a run happened to draw."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
