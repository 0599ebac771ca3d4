"""The paper's sampling protocol for the excitation study (SENet Sec. 7.2, Fig. 6-7).

The paper takes 50 validation images per class and 50 uniformly sampled channels of the last SE block of each stage
before downsampling, plus every block of the last stage, and draws each class's mean excitation beside the mean over
all classes. On SE-ResNet-50 the blocks are SE_2_3, SE_3_4, SE_4_6, SE_5_1, SE_5_2, SE_5_3. The
numbers and the ``SE_<stage>_<block>`` grammar are :mod:`se_surgery.paper`'s.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from se_surgery.paper import CHANNELS, paper_stage

__all__ = ["paper_blocks", "paper_stages", "sample_channels"]


def paper_stages(blocks: Sequence[str], paper_names: Mapping[str, str]) -> dict[int, list[str]]:
    """Stage number -> its SE module names in forward order, from ``SE_<stage>_<block>[_<k>]`` names (others, such
    as ``SE_top``, left out)."""
    stages: dict[int, list[str]] = {}
    for block in blocks:
        stage = paper_stage(paper_names.get(block, ""))
        if stage is not None:
            stages.setdefault(stage, []).append(block)
    return dict(sorted(stages.items()))


def paper_blocks(blocks: Sequence[str], paper_names: Mapping[str, str]) -> list[str]:
    """The last SE block of every stage but the final one, then every block of the final stage, in forward order.

    Args:
        blocks: SE module names in forward order.
        paper_names: SE module name -> ``SE_<stage>_<block>``; blocks without one are left out.

    Returns:
        The chosen SE module names; empty when no block has a paper name.
    """
    stages = paper_stages(blocks, paper_names)
    if not stages:
        return []
    *early, last = stages
    chosen = {stages[s][-1] for s in early} | set(stages[last])
    return [b for b in blocks if b in chosen]


def sample_channels(channels: Mapping[str, int], *, k: int = CHANNELS, seed: int = 0) -> dict[str, np.ndarray]:
    """``k`` channel indices per block, drawn uniformly without replacement and sorted (all of them if fewer).

    Each block's draw depends only on ``seed`` and the block's name, so adding or dropping blocks does not change
    the others' channels.

    Args:
        channels: SE module name -> its number of channels C.
        k: Channels per block (the paper's 50).
        seed: The same seed gives the same channels.
    """
    out = {}
    for block, c in channels.items():
        rng = np.random.default_rng([seed, zlib.crc32(block.encode())])
        out[block] = np.sort(rng.choice(c, size=min(k, c), replace=False))
    return out
