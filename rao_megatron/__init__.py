"""rao_megatron: RAO and preference-optimization losses for Megatron-Core."""
__version__ = "0.1.0"
