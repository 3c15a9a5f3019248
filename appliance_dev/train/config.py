"""What the demonstration model is: the package's name and version, the input specification serving
resamples to (the manifest's ``[input]`` and ``[normalisation]``), the network's widths and the seed ranges.
"""

from __future__ import annotations

from appliance.infer.preprocess import InputSpec

NAME = "liver-ct-demo"
VERSION = "1.4.0"
N_CLASSES = 3
SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64),
                 max_size=(256, 256), window=(-250.0, 350.0))
OPT_SIZE = (192, 192)
OPT_BATCH, MAX_BATCH = 8, 16
WIDTHS = (12, 24, 48, 96, 192)  # --width 12 (the default), doubling per level
HELDOUT_SEED0 = 1_000_000
