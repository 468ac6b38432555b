"""Data: formats, chat templates, groups of responses, and packing into fixed-shape micro-batches."""

from .batcher import GroupBatcher
from .collate import IGNORE_INDEX, PAD_GROUP, collate_sequences, num_valid_groups, sequence_key
from .errors import DataError, DataReport
from .formats import Example, read_examples
from .tokenize import TokenizedGroup, split_heldout, tokenize_examples
from .tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

__all__ = ["IGNORE_INDEX", "PAD_GROUP", "TINY_TOKENIZER_DIR", "DataError", "DataReport", "Example", "GroupBatcher",
           "TokenizedGroup", "collate_sequences", "load_tokenizer", "num_valid_groups", "read_examples",
           "sequence_key", "split_heldout", "tokenize_examples"]
