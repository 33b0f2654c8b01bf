"""Evaluations that execute model-written code: the sandbox and HumanEval."""
