"""GPU memory through NVML, for sidecar mode: the picker runs beside one Triton and sees its GPUs.

NVML answers in microseconds with current values, where Triton's ``nv_gpu_*`` series are refreshed only
every ``--metrics-interval-ms`` (2 s by default), so for ``fleet.picker.nvml_host`` these readings take
precedence. Every call here blocks (ctypes into libnvidia-ml): the collector runs :meth:`NvmlReader.read`
in ``asyncio.to_thread``.

A machine without the driver (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``, ...) is
normal (CPU hosts, CI): the first failed ``nvmlInit`` is logged once at info and the reader disables
itself for good.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import pynvml
import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    memory_used: int  # bytes, summed over the devices read
    memory_total: int
    utilization: float | None  # mean over devices, 0-1; None where the driver does not report it
    devices: int


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """A ``CUDA_VISIBLE_DEVICES``-style list: ``None`` = every device, else indices and/or ``GPU-`` UUIDs.

    Returns ``None`` also for forms this reader does not map (MIG instances), so that all devices are
    read rather than none. An empty string means no device at all (``[]``). Note that CUDA numbers
    devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, while NVML indices follow the PCI bus.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return []
    out: list[int | str] = []
    for item in (part.strip() for part in value.split(",")):
        if item.isdigit():
            out.append(int(item))
        elif item.startswith("GPU-"):
            out.append(item)
        else:
            return None
    return out


class NvmlReader:
    """Reads used/total memory (and utilisation) summed over the visible GPUs. Not thread-safe: one
    caller at a time (the collector never overlaps two reads)."""

    def __init__(self, visible_devices: str | None = None, *, from_env: bool = True) -> None:
        if visible_devices is None and from_env:
            visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._visible = visible_devices
        self._handles: list[Any] | None = None
        self.disabled = False

    def _open(self) -> list[Any] | None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.info("nvml unavailable, GPU memory comes from Triton's metrics only", error=str(exc))
            self.disabled = True
            return None
        try:
            wanted = parse_visible_devices(self._visible)
            if wanted is None:
                if self._visible:
                    log.info("CUDA_VISIBLE_DEVICES not understood, reading every GPU", value=self._visible)
                wanted = list(range(pynvml.nvmlDeviceGetCount()))
            handles = [
                pynvml.nvmlDeviceGetHandleByUUID(d) if isinstance(d, str) else pynvml.nvmlDeviceGetHandleByIndex(d)
                for d in wanted
            ]
        except pynvml.NVMLError as exc:
            log.info("nvml cannot open the GPUs, GPU memory comes from Triton's metrics only", error=str(exc))
            self._shutdown()
            self.disabled = True
            return None
        if not handles:
            log.info("no GPU visible to nvml, GPU memory comes from Triton's metrics only")
            self._shutdown()
            self.disabled = True
            return None
        return handles

    def read(self) -> GpuReading | None:
        """One reading; ``None`` once disabled. Blocking. Raises ``pynvml.NVMLError`` if a device that
        opened fails later (e.g. ``GpuIsLost``)."""
        if self.disabled:
            return None
        if self._handles is None:
            self._handles = self._open()
            if self._handles is None:
                return None
        used = total = 0
        utils: list[float] = []
        for handle in self._handles:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            used += int(memory.used)
            total += int(memory.total)
            # Not supported on every device (e.g. MIG): memory is what matters.
            with contextlib.suppress(pynvml.NVMLError):
                utils.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        utilization = sum(utils) / len(utils) if utils and len(utils) == len(self._handles) else None
        return GpuReading(memory_used=used, memory_total=total, utilization=utilization, devices=len(self._handles))

    def close(self) -> None:
        """Release NVML (blocking). The reader may be used again afterwards."""
        if self._handles is not None:
            self._handles = None
            self._shutdown()

    @staticmethod
    def _shutdown() -> None:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
