"""The metric catalogue: every family the appliance exports, with its type, unit, labels and meaning.

Names and labels are a contract with every fleet that scrapes a box: a test compares the exposition with this
table and the README's copy of it. Labels are bounded sets (states, configured names, defined DICOM terms);
never a UID, a patient or study attribute, or text a peer typed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # gauge | counter | info | histogram
    unit: str
    labels: tuple[str, ...]
    help: str


CATALOGUE: tuple[Family, ...] = (
    Family(
        "appliance_build",
        "info",
        "",
        ("version", "platform", "device_id", "site_id"),
        "The appliance's version and platform, and [device] id and site (empty until configured; not named device/site, the fleet's target labels).",
    ),
    Family(
        "appliance_model",
        "info",
        "",
        ("model", "version", "backend", "precision", "device"),
        "A model package routes can use, with the backend it last ran on (configured, before its first job).",
    ),
    Family("appliance_dicom_associations", "gauge", "", (), "DICOM associations open now, across all listeners."),
    # Not "appliance_dicom_associations_total": in OpenMetrics that counter and the gauge above would be one
    # family name twice, and Prometheus negotiates OpenMetrics first.
    Family(
        "appliance_dicom_association_results",
        "counter",
        "",
        ("result",),
        "Associations by result: accepted, released, aborted (or lost with a listener), rejected_<reason>.",
    ),
    Family("appliance_dicom_listeners_up", "gauge", "", (), "Listener processes alive (of [dicom] listeners)."),
    Family(
        "appliance_dicom_instances_received",
        "counter",
        "",
        ("modality",),
        "Instances stored and acknowledged, by Modality (defined terms; anything else is 'other').",
    ),
    Family("appliance_dicom_received", "counter", "bytes", (), "Bytes of instances stored."),
    Family(
        "appliance_dicom_store_failures",
        "counter",
        "",
        ("status",),
        "C-STORE requests answered with a failure, by DICOM status (hex).",
    ),
    Family(
        "appliance_dicom_protocol_errors",
        "counter",
        "",
        ("kind",),
        "Associations aborted for a protocol violation, by kind (oversized_pdu, undecodable_pdu, ...).",
    ),
    Family("appliance_series", "gauge", "", ("state",), "Series in each state."),
    Family("appliance_queue_depth", "gauge", "", ("priority",), "Jobs waiting for the worker, by route priority."),
    Family("appliance_jobs", "counter", "", ("model", "result"), "Jobs finished, by model and result (done, failed)."),
    Family(
        "appliance_export_attempts",
        "counter",
        "",
        ("destination", "result"),
        "Attempts to send a result object, by configured destination and result (ok, failed).",
    ),
    Family("appliance_outbox_pending", "gauge", "", ("destination",), "Result objects waiting to be sent."),
    Family(
        "appliance_outbox_dead",
        "gauge",
        "",
        ("destination",),
        "Dead letters: result objects that gave up (appliance outbox retry sends them again).",
    ),
    Family(
        "appliance_export_oldest_pending",
        "gauge",
        "seconds",
        ("destination",),
        "Age of the oldest result object still waiting for a destination (0 when none waits).",
    ),
    Family("appliance_disk_free", "gauge", "bytes", ("path",), "Free bytes on the data filesystem."),
    Family("appliance_disk_reserve", "gauge", "bytes", (), "[storage] min_free_bytes: below it C-STOREs are refused."),
    Family(
        "appliance_ready",
        "gauge",
        "",
        ("check",),
        "Each /readyz check (store, listeners, worker, models, disk): 1 passing, 0 failing.",
    ),
    Family("appliance_worker_up", "gauge", "", (), "1 while the inference worker process is alive."),
    Family("appliance_gpu_utilization", "gauge", "ratio", (), "GPU busy fraction (NVML, or GR3D on Jetson)."),
    Family(
        "appliance_gpu_memory_used", "gauge", "bytes", (), "GPU memory in use (NVML; absent on Jetson's shared memory)."
    ),
    Family("appliance_gpu_temperature", "gauge", "celsius", (), "GPU temperature."),
    Family("appliance_gpu_power", "gauge", "watts", (), "GPU power draw (on Orin: the CPU+GPU+CV rail)."),
    Family(
        "appliance_process_cpu",
        "counter",
        "seconds",
        ("role",),
        "CPU time of each appliance process (supervisor, listener-N, worker); resets when that process restarts.",
    ),
    Family(
        "appliance_process_resident_memory", "gauge", "bytes", ("role",), "Resident memory of each appliance process."
    ),
    Family(
        "appliance_store_duration",
        "histogram",
        "seconds",
        (),
        "One instance from its data set received to durable (file fsynced, index row written).",
    ),
    Family(
        "appliance_stage_duration",
        "histogram",
        "seconds",
        ("stage",),
        "One job's time in each worker stage (decode, preprocess, infer, postprocess, measure, results).",
    ),
    Family(
        "appliance_time_to_job",
        "histogram",
        "seconds",
        (),
        "A series' last instance to its job starting (first attempt).",
    ),
    Family(
        "appliance_time_to_result",
        "histogram",
        "seconds",
        ("model",),
        "A series' last instance to every result of the model's job acknowledged by its destinations.",
    ),
)

BY_NAME = {f.name: f for f in CATALOGUE}


def exposed_name(f: Family) -> str:
    """The name a sample carries: ``_info``, ``_total`` and unit suffixes as Prometheus conventions want them."""
    name = f.name + (f"_{f.unit}" if f.unit else "")
    return name + {"counter": "_total", "info": "_info"}.get(f.kind, "")
