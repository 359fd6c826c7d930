"""Deterministic synthetic tasks: every sample is a function of (task, seed, length, depth).

A sample is a context (what gets compressed), a question asked after it, and the reference answer; keyed tasks
also carry the other questions the same context answers (`followups`), which training asks in sequence.
Training and evaluation draw from disjoint seed ranges (see seeds.py).
"""
from dataclasses import dataclass, field


@dataclass
class Sample:
    task: str
    context: str
    question: str
    answer: str
    length: int  # requested context length in tokens
    depth: float  # where the asked fact sits in the context, 0 (start) .. 1 (end)
    followups: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) about the other facts
