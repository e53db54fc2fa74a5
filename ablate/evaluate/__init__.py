"""Evaluation: refusal scorers, over-refusal, capability, divergence and statistics.

`ablate.evaluate.refusal` holds the substring scorer every stage uses to print a refusal rate.
"""
