"""One ingest listener process: a pynetdicom server accepting on the supervisor's socket.

Runs in its own process (see ``appliance.service``) so that several associations are served in
parallel despite the GIL, and so a crash here never takes the other stages down.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

from appliance import logs
from appliance.config import Config
from appliance.ingest.guard import Limits, end_connection, guard_pynetdicom
from appliance.ingest.receiver import Receiver
from appliance.ingest.scp import AssociationSlots, Ingest
from appliance.ingest.tuning import quiet_pydicom_validation, tune_pynetdicom
from appliance.store import Store
from appliance.store.locks import hold_processes_lock

log = logging.getLogger("appliance.ingest")

#: How long in-flight C-STOREs get to finish after SIGTERM before the process exits anyway.
DRAIN_SECONDS = 8.0


def run_listener(config: Config, sock: socket.socket, slots: AssociationSlots, slot: int, ready: Any) -> None:
    """Process entry point: serve until SIGTERM, then drain and exit."""
    logs.setup(config.logging.level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = Store.open(config.storage.data_dir)
    alive = hold_processes_lock(store.data_dir)  # noqa: F841 (held until this process exits)
    d = config.dicom
    guard_pynetdicom(
        Limits(
            max_pdu=d.max_pdu_size,
            max_association_pdu=d.max_association_pdu,
            network_timeout=d.network_timeout,
            acse_timeout=d.acse_timeout,
            memory_instance_bytes=d.memory_instance_bytes,
            max_instance_bytes=d.max_instance_bytes,
            spill_dir=str(store.spool.incoming),
            on_violation=lambda kind: store.index.count("ingest_protocol_errors", kind),
        )
    )
    tune_pynetdicom()
    quiet_pydicom_validation()
    receiver = Receiver(store, config.storage.min_free_bytes, on_duplicate=config.storage.on_duplicate)
    receiver.max_inflated = d.max_instance_bytes
    ingest = Ingest(config, receiver, slots, slot)
    ae = ingest.make_ae()
    server = ingest.make_server(ae, sock)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="accept", daemon=True)
    thread.start()
    ready.set()
    stop.wait()

    # Stop accepting, refuse further C-STOREs, end open associations; a handler that is writing
    # finishes its write and commit (the sender, seeing the abort, resends: a harmless duplicate).
    receiver.stopping.set()
    server.shutdown()
    assocs = list(server.active_associations)
    for assoc in assocs:
        end_connection(assoc)  # A-ABORT if established; a connection still negotiating is just closed
    deadline = time.monotonic() + DRAIN_SECONDS  # one budget for all, not one each
    for assoc in assocs:
        assoc.join(max(0.0, deadline - time.monotonic()))
    store.index.close()
    log.info("listener %d stopped (%d association(s) ended)", slot, len(assocs))
