"""M2N2 (Model Merging of Natural Niches) for mergekit and Optuna."""

from m2n2_plugin.kernel import global_cosine
from m2n2_plugin.kernel import split_index
from m2n2_plugin.kernel import split_slerp

__all__ = ["global_cosine", "split_index", "split_slerp"]
__version__ = "0.1.0"
