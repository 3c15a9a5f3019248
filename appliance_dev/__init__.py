"""Development code for the appliance: phantom generator, test and benchmark helpers, model training.

Not part of the runtime: the wheel ships ``appliance`` only (see ``[tool.setuptools.packages.find]`` in
pyproject.toml), and nothing under ``appliance/`` may import this package. It is importable in the
project's own venv because ``scripts/dev setup`` puts the project root on that venv's path (a ``.pth``
file), and in test runs through pytest's ``pythonpath`` setting.

- ``synthetic``: synthetic abdominal CT phantoms with liver and lesion labels (training, tests, benchmarks);
- ``dicom_factory``, ``model_factory``: small DICOM instances and series, and small real model packages;
- ``manifest``, ``toml_writer``: model-package manifests built from the runtime schema and written as TOML;
- ``harness``, ``receivers``, ``ct_series``: the benchmarks' process handling, DICOM peers and CT series;
- ``real_ct``: the shared real abdominal CT and the views of it the demo model is reported on;
- ``train``: the demonstration model's data, network, training loop, evaluation and packaging.
"""
