"""Edge inference appliance for clinics.

Pipeline stages (``ingest``, ``assemble``, ``route``, ``infer`` and ``results`` in the ``worker``, ``export``,
``retention``, ``metrics``) talk only through the durable ``store``; ``service`` supervises them and ``cli`` is the command.
Below them all: ``models`` (packages and manifests), ``store``, and small foundations (``errors``, ``fsio``,
``validation``, ``dicomio``, ``logs``, ``status``). ``tests/test_layers.py`` keeps the dependencies pointing
down.
"""

__version__ = "0.1.0"

#: Shown in DICOM (ImplementationVersionName is limited to 16 characters) and in logs.
IMPLEMENTATION_VERSION_NAME = f"EDGEAPPL_{__version__}"[:16]
