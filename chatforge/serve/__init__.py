"""Serving: an OpenAI-compatible API over the continuous-batching scheduler, a web chat page and the feedback
store whose exports feed SFT and reward-model training (``chatforge serve``, ``chatforge feedback export``)."""
