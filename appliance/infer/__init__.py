"""The ``infer`` stage: a complete, routed series in, a label map with measurements out.

Decoding, geometry, resampling and the backends live in their own modules so that the worker, the
offline ``appliance infer`` command and the training script run exactly the same code.
"""
