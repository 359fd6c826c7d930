"""Deterministic synthetic tasks: every sample is a function of (task, seed, length, depth).

A sample is a context (what gets compressed), a question asked after it, and the reference answer.
Training and evaluation draw from disjoint seed ranges (see seeds.py).
"""
from dataclasses import dataclass


@dataclass
class Sample:
    task: str
    context: str
    question: str
    answer: str
    length: int  # requested context length in tokens
    depth: float  # where the asked fact sits in the context, 0 (start) .. 1 (end)
    follow_ups: tuple[tuple[str, str], ...] = ()  # (question, answer) pairs asked next, after the model's own answers
