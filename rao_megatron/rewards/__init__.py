"""Rewards: annotate data sets with a reward model or a rule function; reward-model reports and data."""
