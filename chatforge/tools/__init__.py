"""Tools the model calls in a LaMDA-style toolset loop: calculator, retrieval, user plug-ins."""
