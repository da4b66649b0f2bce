"""Process groups and parallel layers. Holds the single registry of process groups."""

from .state import barrier, get_rank, get_world_size, is_rank_zero, print_rank_0

__all__ = ["barrier", "get_rank", "get_world_size", "is_rank_zero", "print_rank_0"]
