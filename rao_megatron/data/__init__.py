"""Data: chat templates, groups of responses, and packing into fixed-shape micro-batches."""

from .collate import IGNORE_INDEX, PAD_GROUP, collate_sequences, num_valid_groups

__all__ = ["IGNORE_INDEX", "PAD_GROUP", "collate_sequences", "num_valid_groups"]
