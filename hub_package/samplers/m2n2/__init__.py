"""M2N2 (Model Merging of Natural Niches) for Optuna: archive, resource competition, attraction.

Load it from OptunaHub (``optunahub.load_module("samplers/m2n2")``) or, inside the m2n2 plugin,
as ``m2n2_plugin.hub``. Both are this one folder.
"""

from .archive import Archive
from .m2n2 import M2N2Sampler
from .m2n2 import split_point_names
from .niches import attraction
from .niches import can_enter
from .niches import draw_parents
from .niches import parent_a_probabilities
from .niches import parent_b_probabilities
from .niches import replace_index
from .niches import shared_fitness


__all__ = [
    "Archive",
    "M2N2Sampler",
    "attraction",
    "can_enter",
    "draw_parents",
    "parent_a_probabilities",
    "parent_b_probabilities",
    "replace_index",
    "shared_fitness",
    "split_point_names",
]
