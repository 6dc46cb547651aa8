"""Curvature: the five methods, the per-layer curvature blocks and their registry."""

from .block import WEIGHT_SHARING, BlockCost, BlockOptions, CurvatureBlock
from .dense_block import DenseKroneckerBlock
from .embedding import approximate_embedding
from .embedding_block import EmbeddingBlock
from .estimator import KroneckerEstimator
from .kronecker_block import KroneckerBlock
from .methods import METHODS, approximate, method_rank
from .registry import DEFAULT_BLOCKS, block_class, register_block
from .scale_shift import SCALE_SHIFT_MODES, ScaleShiftCurvature, ScaleShiftInverse
from .scale_shift_block import ScaleShiftBlock

__all__ = ["approximate", "METHODS", "method_rank", "KroneckerEstimator", "CurvatureBlock",
           "BlockOptions", "BlockCost", "KroneckerBlock", "DEFAULT_BLOCKS", "block_class",
           "register_block", "DenseKroneckerBlock", "WEIGHT_SHARING", "EmbeddingBlock",
           "approximate_embedding", "ScaleShiftBlock", "ScaleShiftCurvature",
           "ScaleShiftInverse", "SCALE_SHIFT_MODES"]
