"""A device's health report as the fleet's tests need it: minimal figures, optionally a model running."""

from protocol.messages import Health, ModelHealth


def health_report(
    device_id: str, *, seq: int = 1, model: str | None = None, version: int | None = None
) -> Health:
    """`model` v`version` running in slot a (what makes the fleet build a delta from it), or none."""
    models = []
    if model is not None and version is not None:
        models = [ModelHealth(name=model, version=version, slot="a", backend="onnxruntime-cpu")]
    return Health(
        device_id=device_id,
        seq=seq,
        ts=0.0,
        uptime_s=1.0,
        cpu_percent=0.0,
        memory_percent=0.0,
        disk_free_bytes=1,
        disk_percent=1.0,
        models=models,
    )
