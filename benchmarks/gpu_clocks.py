"""The card's SM clock, power draw, temperature and the reasons NVML gives for holding the clock down, sampled on a
background thread while a benchmark runs: tells a kernel that is slower inside a long forward because the card
clocks down under sustained load (power cap, heat) from one that is slower for its own reasons, and shows when two
rows of one run ran at different clocks."""

from __future__ import annotations

import os
import statistics
import threading
import time

REASONS = {0x4: "power cap", 0x8: "hw slowdown", 0x20: "sw thermal", 0x40: "hw thermal", 0x80: "power brake"}
"""NVML clock-event reason bits worth naming (idle, application clocks and sync boost are left out)."""


class ClockSampler:
    """``with ClockSampler(index) as s: ...`` then ``s.brief()`` / ``s.summary()``; empty where NVML
    (``nvidia-ml-py``) is missing, e.g. on a CPU machine."""

    def __init__(self, index: int = 0, period_s: float = 0.005) -> None:
        """``index``: the CUDA device index (of the visible devices; NVML numbers every card, see ``nvml_handle``)."""
        self.index, self.period_s = index, period_s
        self.samples: list[tuple[float, float, float, int]] = []  # MHz, W, degrees C, reason bits
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self.instant_power = False
        """Whether the power samples are instantaneous; ``nvmlDeviceGetPowerUsage`` averages over ~1 s on Ampere and
        newer, which blurs a row of ~1 s that follows idle time."""

    def __enter__(self) -> ClockSampler:
        try:
            import pynvml
        except ImportError:
            return self
        pynvml.nvmlInit()
        self._nvml = pynvml
        handle = nvml_handle(pynvml, self.index)
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        power = self._power_reader(pynvml, handle)

        def run() -> None:
            while not self._stop.is_set():
                self.samples.append((float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                                     power(),
                                     float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
                                     int(reasons(handle))))
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def _power_reader(self, pynvml, handle):
        """Watts now: the instantaneous field where the driver has it, else the ~1 s average."""
        field = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field is not None:
            def instant() -> float:
                value = pynvml.nvmlDeviceGetFieldValues(handle, [field])[0]
                if value.nvmlReturn != pynvml.NVML_SUCCESS:
                    raise RuntimeError(f"NVML field {field}: return code {value.nvmlReturn}")
                return value.value.uiVal / 1000.0

            try:
                instant()
                self.instant_power = True
                return instant
            except Exception:  # noqa: BLE001 - an older driver or binding: use the averaged reading
                pass
        return lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._nvml.nvmlShutdown()

    def _reasons(self) -> str:
        """Each named reason with the share of samples it was active in."""
        n = len(self.samples)
        parts = [f"{name} {sum(1 for s in self.samples if s[3] & bit) / n:.0%}" for bit, name in REASONS.items()
                 if any(s[3] & bit for s in self.samples)]
        return ", ".join(parts) or "no limiter"

    def brief(self) -> str:
        """``"1650 MHz 690 W 61 C power cap 80%"``: medians over the samples, and the active limiters."""
        if not self.samples:
            return "no NVML samples"
        mhz, watts, deg = (statistics.median(s[i] for s in self.samples) for i in range(3))
        return f"{mhz:.0f} MHz {watts:.0f} W{'' if self.instant_power else ' (1 s avg)'} {deg:.0f} C {self._reasons()}"

    def summary(self) -> str:
        if not self.samples:
            return "no NVML samples"
        mhz = [s[0] for s in self.samples]
        return (f"SM clock median {statistics.median(mhz):.0f} MHz (min {min(mhz):.0f}), power median "
                f"{statistics.median(s[1] for s in self.samples):.0f} W"
                f"{'' if self.instant_power else ' (averaged over ~1 s)'}, temperature max "
                f"{max(s[2] for s in self.samples):.0f} C, {self._reasons()}, {len(self.samples)} samples")


def nvml_handle(pynvml, cuda_index: int):
    """NVML's handle of the card CUDA calls ``cuda_index``. NVML numbers the host's cards, CUDA only the visible ones:
    under ``CUDA_VISIBLE_DEVICES=1`` CUDA's device 0 is NVML's card 1 (the process's launcher sets the variable; this
    only reads it to find the card)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        if entry.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
