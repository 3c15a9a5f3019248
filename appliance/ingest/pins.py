"""The pynetdicom internals that ``guard.py`` and ``tuning.py`` replace, pinned by the hash of their source.

A version check alone would trust a patched or vendored pynetdicom that still says 3.0.4. Each patch is
applied only when every callable it replaces (or wraps, or relies on the body of) has exactly the source
it was written against; otherwise the appliance logs which ones differ and runs that part unmodified.
Re-pin with ``python -m appliance.ingest.pins`` after reviewing the new source.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

#: "module:qualified.name" -> sha256 of ``inspect.getsource`` of the original (unwrapped) callable.
PINNED: dict[str, str] = {
    "pynetdicom.dul:DULServiceProvider.__init__": "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.dul:DULServiceProvider.send_pdu": "7cbce5da8594124e9e70c790a68df640d21df11af4220783e752bc607de8dde6",
    "pynetdicom.dul:DULServiceProvider.run_reactor": "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul:DULServiceProvider._read_pdu_data": "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.association:Association.run_reactor": "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    "pynetdicom.association:Association._run_reactor": "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg": "a839cf2fb46976d9da29cf06fea41c04416b38d14fab612af12e5d869bd5b3f0",
    "pynetdicom.fsm:StateMachine.do_action": "9a883f44c7f31641b7847b97b51a72abdd31a3c8a9d31031cae7f7d929383dd9",
    "pynetdicom.dimse_messages:DIMSEMessage.decode_msg": "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
}

#: What each patch set replaces or relies on.
GUARD = (
    "pynetdicom.dul:DULServiceProvider._read_pdu_data",
    "pynetdicom.dul:DULServiceProvider.run_reactor",
    "pynetdicom.association:Association.run_reactor",
    "pynetdicom.fsm:StateMachine.do_action",
    "pynetdicom.dimse_messages:DIMSEMessage.decode_msg",
)
TUNING = (
    "pynetdicom.dul:DULServiceProvider.__init__",
    "pynetdicom.dul:DULServiceProvider.send_pdu",
    "pynetdicom.dul:DULServiceProvider.run_reactor",
    "pynetdicom.association:Association._run_reactor",
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg",
)


def resolve(name: str) -> Any:
    """The original callable named ``module:Qual.name``, through any ``functools.wraps`` wrappers of ours."""
    module, _, qual = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)


def source_hash(name: str) -> str:
    return hashlib.sha256(inspect.getsource(resolve(name)).encode("utf-8")).hexdigest()


def mismatches(names: tuple[str, ...], pinned: dict[str, str] | None = None) -> list[str]:
    """The callables among ``names`` whose source is not the pinned one (missing ones included)."""
    table = PINNED if pinned is None else pinned
    out = []
    for name in names:
        try:
            ok = source_hash(name) == table.get(name)
        except (AttributeError, ImportError, OSError, TypeError):
            ok = False
        if not ok:
            out.append(name)
    return out


def refusal(names: tuple[str, ...], version: str) -> str | None:
    """Why the patches of ``names`` must not be applied here (None: they may): the installed pynetdicom is not
    ``version``, or one of the callables differs from the source they were written against."""
    import pynetdicom

    if pynetdicom.__version__ != version:
        return f"pynetdicom {pynetdicom.__version__} is not the pinned version {version}"
    changed = mismatches(names)
    if changed:
        return f"pynetdicom {version} differs from the source they were written against ({', '.join(changed)})"
    return None


if __name__ == "__main__":  # print the table for the installed pynetdicom
    for key in PINNED:
        print(f'    "{key}": "{source_hash(key)}",')
