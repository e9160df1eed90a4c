"""Pure torch: squeeze, permutations, couplings and the hierarchical IDF. Knows nothing of coding."""

from .idf import HierarchicalIDF, IDFConfig

__all__ = ["HierarchicalIDF", "IDFConfig"]
