"""Evaluations: the sandbox and HumanEval, in-context learning, chain-of-thought, insertion and edit scores."""
