"""What the demonstration model is: the package's name and version, the input specification serving
resamples to (the manifest's ``[input]`` and ``[normalisation]``), the network's widths and the seed ranges.
"""

from __future__ import annotations

from appliance.infer.preprocess import InputSpec

NAME = "liver-ct-demo"
VERSION = "1.5.0"
#: The package's confidence threshold, chosen on validation phantoms after training (the highest that costs no
#: sensitivity for lesions of 10 mm or more: ``scripts/eval_demo_model.py --split validation --variety 2``).
MIN_CONFIDENCE = 0.24
N_CLASSES = 3
SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64),
                 max_size=(256, 256), window=(-250.0, 350.0))
OPT_SIZE = (192, 192)
OPT_BATCH, MAX_BATCH = 8, 16
WIDTHS = (12, 24, 48, 96, 192)  # --width 12 (the default), doubling per level
HELDOUT_SEED0 = 1_000_000
