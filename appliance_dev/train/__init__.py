"""The demonstration liver CT model (``models/liver-ct-demo``): everything ``scripts/train_demo_model.py``
does, in parts. The script is the command line; these modules are what it runs.

- ``config``: what the model is (name, version, input specification, U-Net widths, seed ranges);
- ``model``: the 2D U-Net, BatchNorm folding, and turning an exported model.onnx back into PyTorch;
- ``data``: phantoms rendered onto the model grid through the serving pre-processing, training crops;
- ``loop``: the training loop (loss, schedule, optimiser);
- ``evaluate``: held-out phantoms and the real CT, scored the way serving runs a series;
- ``export``: ONNX export checked against PyTorch and timed;
- ``package``: the model card and the manifest (through ``appliance_dev.manifest``).
"""
