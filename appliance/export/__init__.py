"""Sending result objects to the configured destinations (the ``export`` stage)."""

from appliance.export.sender import Sender

__all__ = ["Sender"]
