"""Evaluation: did the assistant get better? Held-out checks, answers generated through the one
engine, rewards and reward-model comparisons."""
