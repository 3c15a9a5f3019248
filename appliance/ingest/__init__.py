"""The ``ingest`` stage: the DICOM C-ECHO / C-STORE SCP that writes into the durable store."""
