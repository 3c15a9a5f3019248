"""The pynetdicom side of ingest: the AE, its presentation contexts, and the event handlers.

pynetdicom's events keep protocol and storage apart: association-level policy (allow-list,
capacity) lives in the EVT_REQUESTED handler, each C-STORE is handed to :class:`Receiver`.
"""

from __future__ import annotations

import copy
import logging
import socket
import socketserver
import threading
import time
import uuid
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time from a table: invisible to a type checker
from pynetdicom.transport import ThreadedAssociationServer

from appliance import IMPLEMENTATION_VERSION_NAME
from appliance.config import Config
from appliance.ingest.guard import SpilledDataset, on_connection_end
from appliance.ingest.receiver import IMPLEMENTATION_CLASS_UID, Receiver
from appliance.ingest.status import REJECT_CALLING_AE_NOT_RECOGNIZED, REJECT_LOCAL_LIMIT_EXCEEDED, StoreStatus

log = logging.getLogger("appliance.ingest")


#: pynetdicom accepts, per proposed context, the first syntax of *this* list the sender offered. Explicit
#: VR Little Endian first: it keeps each element's VR (private tags included) and every SCU can send
#: it; pydicom's own order starts with Implicit VR, which made storescu convert Explicit VR files.
ACCEPTED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian] + [
    ts for ts in AllTransferSyntaxes if ts != ExplicitVRLittleEndian
]


class AssociationSlots(Protocol):
    """A ``multiprocessing.Array('i', listeners)``: associations open in each listener process.

    One slot per listener so a listener that dies can be restarted with its slot cleared.
    """

    def get_lock(self) -> Any: ...
    def __getitem__(self, i: int) -> int: ...
    def __setitem__(self, i: int, v: int) -> None: ...
    def __len__(self) -> int: ...


class _ContextList(list):
    """Supported presentation contexts whose deepcopy is cheap.

    pynetdicom deep-copies the server's contexts for every association; with every storage SOP class
    times every transfer syntax that is ~6,600 pydicom UID objects rebuilt one by one, 0.1-0.3 s of
    CPU per association. Copying each context and its transfer-syntax list (UIDs are immutable
    strings) gives the association the same private, mutable copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _ContextList:
        out = _ContextList()
        for cx in self:
            dup = copy.copy(cx)
            for key, value in vars(cx).items():
                if isinstance(value, list):
                    setattr(dup, key, list(value))
            out.append(dup)
        return out


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server accepting on a listening socket the supervisor bound.

    Several listener processes accept on the one socket: one Python process holds one GIL, so
    parallel associations only run in parallel in separate processes. The socket is non-blocking
    so a listener that loses the race for a connection goes back to waiting instead of hanging.
    """

    daemon_threads = True
    request_queue_size = 64
    inherited_socket: socket.socket | None = None
    #: Connections (negotiating or associated) one listener serves at once; more are closed on accept.
    #: Each costs two threads, so a flood of connections that never associate cannot exhaust them.
    max_connections: int = 0
    _last_refusal_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _ContextList(self.contexts)

    def server_bind(self) -> None:
        if self.inherited_socket is None:
            raise RuntimeError("SharedSocketServer needs inherited_socket set before it is created")
        if self.socket is not None:  # the one socketserver made: unused, every listener shares ours
            self.socket.close()
        sock = self.inherited_socket
        self.socket = sock
        sock.setblocking(False)
        self.server_address = sock.getsockname()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.max_connections and live_acceptors() >= self.max_connections:
            now = time.monotonic()
            if now - self._last_refusal_log > 10.0:  # one line per flood, not one per connection
                log.warning(
                    "connection from %s closed: this listener already serves %d connections "
                    "(max_associations + %d negotiating)",
                    client_address[0],
                    self.max_connections,
                    PENDING_CONNECTIONS,
                )
                self._last_refusal_log = now
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def server_close(self) -> None:
        # Only this process's descriptor: shutdown() would stop the other listeners accepting too.
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        # pynetdicom's shutdown() also unregisters from AE.start_server's list, which make_server
        # never joined; stop serving and close, nothing more.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


#: Connections per listener beyond max_associations that may be negotiating (or idle before it) at once.
PENDING_CONNECTIONS = 64


def live_acceptors() -> int:
    """Association threads serving a peer in this process, whatever their state."""
    from pynetdicom.association import Association

    return sum(1 for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor and t.is_alive())


class Ingest:
    """Binds a :class:`Receiver` to pynetdicom events for one listener process."""

    def __init__(
        self, config: Config, receiver: Receiver, slots: AssociationSlots | None = None, slot: int = 0
    ) -> None:
        self.config = config
        self.receiver = receiver
        self.slots = slots
        self.slot = slot
        self._ids: dict[int, str] = {}
        self._counted: set[int] = set()
        self._lock = threading.Lock()
        self._allowed = [(c.ae_title, c.host) for c in config.dicom.allowed_callers]

    # -- building the server -------------------------------------------------------------------------

    def make_ae(self) -> AE:
        _config.LOG_HANDLER_LEVEL = "none"  # per-PDU debug logging costs ~10% of ingest time
        ae = AE(ae_title=self.config.dicom.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.require_called_aet = True
        # Our cross-process slots are the limit on associations. pynetdicom's own per-process check
        # counts every connection's thread, idle ones never associated included, so it would refuse
        # real senders while scanners hold sockets open: it is set past what a listener ever serves.
        ae.maximum_associations = self.config.dicom.max_associations + PENDING_CONNECTIONS
        ae.maximum_pdu_size = self.config.dicom.max_pdu_size
        ae.network_timeout = self.config.dicom.network_timeout
        ae.acse_timeout = self.config.dicom.acse_timeout
        ae.dimse_timeout = 60
        ae.add_supported_context(str(Verification))
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[Any]:  # pynetdicom's evt handler tuples
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def make_server(self, ae: AE, sock: socket.socket) -> SharedSocketServer:
        server_class = type(
            "ListenerServer",
            (SharedSocketServer,),
            {"inherited_socket": sock, "max_connections": self.config.dicom.max_associations + PENDING_CONNECTIONS},
        )
        server = ae.make_server(sock.getsockname()[:2], evt_handlers=self.handlers(), server_class=server_class)
        assert isinstance(server, SharedSocketServer)
        return server

    # -- association policy ------------------------------------------------------------------------

    @staticmethod
    def _reject(assoc: Any, reason: tuple[int, int, int]) -> None:
        """Send A-ASSOCIATE-RJ and wait until it went out, as pynetdicom does for its own rejections.

        Returning straight away would let pynetdicom close the socket first: the sender then
        reports an abort instead of the reason.
        """
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        # requestor.ae_title is only filled in later, during negotiation; the request has it now.
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        host = assoc.requestor.address
        if self._allowed and not any(ae == calling and (h is None or h == host) for ae, h in self._allowed):
            known_ae = any(ae == calling for ae, _ in self._allowed)
            why = (
                f"host {host} is not allowed for AE title {calling!r}"
                if known_ae
                else f"calling AE title {calling!r} is not in allowed_callers"
            )
            log.warning("association from %s:%s rejected: %s", host, assoc.requestor.port, why)
            self.receiver.store.index.count("ingest_rejected_associations", "calling_ae_not_allowed")
            self._reject(assoc, REJECT_CALLING_AE_NOT_RECOGNIZED)
            return
        if self.slots is not None:
            with self.slots.get_lock():
                if sum(self.slots[i] for i in range(len(self.slots))) >= self.config.dicom.max_associations:
                    full = True
                else:
                    self.slots[self.slot] += 1
                    full = False
            if full:
                log.warning(
                    "association from %s (%s) rejected: max_associations=%d already open",
                    calling,
                    host,
                    self.config.dicom.max_associations,
                )
                self.receiver.store.index.count("ingest_rejected_associations", "local_limit_exceeded")
                self._reject(assoc, REJECT_LOCAL_LIMIT_EXCEEDED)
                return
            with self._lock:
                self._counted.add(id(assoc))
        # Whatever ends the connection (release, abort, reset, timeout, an exception in a pynetdicom
        # thread), its slot and its index row are released when the DUL thread is over.
        on_connection_end(assoc, lambda: self._finish_assoc(assoc, "aborted"))

    def on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        aid = uuid.uuid4().hex
        req = assoc.requestor
        index = self.receiver.store.index
        # Under the lock, so the row is in the index before any end of the connection closes it: the
        # reader thread can end (a violation, a reset) while this thread is still negotiating.
        with self._lock:
            ended = getattr(assoc, "_edge_finished", False)
            if not ended:
                self._ids[id(assoc)] = aid
            try:
                index.open_association(aid, req.ae_title.strip(), f"{req.address}:{req.port}")
                if ended:
                    index.close_association(aid, "aborted")
            except Exception:
                log.exception("could not record association %s", aid)
        log.info(
            "association %s from %s (%s:%s) established%s",
            aid[:8],
            req.ae_title.strip(),
            req.address,
            req.port,
            ", but its connection had already ended (aborted)" if ended else "",
        )

    def _finish(self, event: evt.Event, outcome: str) -> None:
        self._finish_assoc(event.assoc, outcome)

    def _finish_assoc(self, assoc: Any, outcome: str) -> None:
        """Release the association's slot and close its index row, once (later calls do nothing)."""
        key = id(assoc)
        with self._lock:
            assoc._edge_finished = True
            aid = self._ids.pop(key, None)
            counted = key in self._counted
            self._counted.discard(key)
            if counted and self.slots is not None:
                with self.slots.get_lock():
                    self.slots[self.slot] -= 1
            if aid is not None:
                try:
                    self.receiver.store.index.close_association(aid, outcome)
                except Exception:
                    log.exception("could not record the end of association %s", aid)
        if aid is not None:
            log.info("association %s %s", aid[:8], outcome)

    def on_released(self, event: evt.Event) -> None:
        self._finish(event, "released")

    def on_aborted(self, event: evt.Event) -> None:
        self._finish(event, "aborted")

    def on_conn_close(self, event: evt.Event) -> None:
        # The DUL thread reports the close of a normally released association (action AR-5, in state
        # Sta13 "awaiting transport close" after our A-RELEASE-RP) and can do so before the association
        # thread has fired EVT_RELEASED: that is a release. Any other close (network drop, after a
        # reject) counts as an abort, so only the idle rule may complete the series. Sta13 also follows
        # an A-ABORT we sent (network timeout): that one is an abort.
        assoc = event.assoc
        state = getattr(getattr(assoc.dul, "state_machine", None), "current_state", None)
        aborted = getattr(assoc, "_sent_abort", False) or getattr(assoc, "is_aborted", False)
        self._finish(event, "released" if state == "Sta13" and not aborted else "aborted")

    # -- DIMSE -------------------------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        assert isinstance(req, C_STORE)  # EVT_C_STORE carries a C-STORE request
        stream = req.DataSet
        with self._lock:
            aid = self._ids.get(id(event.assoc))
        args = (
            str(event.context.transfer_syntax),
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            event.assoc.requestor.ae_title,
            aid,
        )
        if isinstance(stream, SpilledDataset):  # too large for memory: it arrived into a file
            try:
                outcome = self.receiver.store_instance(stream, *args)
            finally:
                stream.discard()  # gone already if it was stored (renamed into the spool)
        else:
            # A view, not a copy, of the received bytes; released before pynetdicom closes the stream.
            with stream.getbuffer() if stream is not None else memoryview(b"") as data:
                outcome = self.receiver.store_instance(data, *args)
        if outcome.status == StoreStatus.SUCCESS:
            return 0x0000
        # A failure carries its reason to the sender's log (Error Comment, at most 64 characters).
        rsp = Dataset()
        rsp.Status = int(outcome.status)
        rsp.ErrorComment = outcome.detail.encode("ascii", "replace").decode()[:64]
        return rsp
