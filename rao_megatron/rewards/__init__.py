"""Rewards: annotate data with a reward model or a rule function, evaluate answers; reward-model reports."""
