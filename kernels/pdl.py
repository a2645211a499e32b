"""Programmatic dependent launch (PDL, compute capability 9.0+): a kernel starts while the one
before it on the stream is still running, and waits only where it reads what that one wrote.

Decode at batch 1 is a chain of ~11 kernels a layer, most of them a few microseconds long, so
each kernel's launch and its first loads' latency show up as idle DRAM between kernels. With PDL
(`launch_pdl=True`, kept as an edge when a CUDA graph captures the launch):

    kernel A:  ...... A's main loads ...... launch_dependents() .. A's stores .. exit
    kernel B:                     [launched: loads its weights] wait() ...... B's work

Rules every kernel launched with `launch()` follows (kernels/quant/int4_tc.py, fused.py,
paged_attention.py):
- before `wait()` it reads only weights (tensors no kernel of the step writes) and stores nothing;
- `wait()` returns once the previous kernel has finished and its writes are visible. That kernel
  waited for its own predecessor before finishing, so every earlier kernel is done too.
Kernels not launched with PDL (torch's, cuBLAS) keep plain stream order; `wait()` and
`launch_dependents()` are no-ops in a kernel launched without PDL.

A kernel lets the next one launch with `launch_dependents(PDL, AT)` at its start (AT 1) and
after its main loads (AT 2); the launch's PDL constexpr picks one (`TRIGGER`, `TRIGGER_SMALL`).
The small kernels trigger at their start, int4_tc after its loop: at its start, the next
linear's programs would launch and hold SM slots while this one still streams. Timings:
docs/benchmarks.md.

Off on GPUs before Hopper, with Triton before 3.3, in the interpreter (no PTX) and with
HEARTH_PDL=0.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton 3.3+ (griddepcontrol); older versions launch every kernel plainly
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

ENABLED = os.environ.get("HEARTH_PDL", "1") != "0"  # module switch (benchmarks, bisecting)
TRIGGER = 2  # int4_tc lets the next kernel launch after its main loop (1: at its start)
TRIGGER_SMALL = 1  # norm, rotary, attention, SiLU: at their start (2: after their loads; 0: no PDL)
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CAPABLE: dict[int, bool] = {}


def hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0+, outside the interpreter, and a Triton with
    griddepcontrol (3.3+)."""
    if _INTERPRETING or device.type != "cuda" or gdc_wait is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _CAPABLE[index]


def mode(device: torch.device, small: bool = False) -> int:
    """The PDL constexpr of a kernel on this device: 0 (plain launch) or where it triggers."""
    if not ENABLED or (small and not TRIGGER_SMALL) or not hopper(device):
        return 0
    return TRIGGER_SMALL if small else TRIGGER


def active(device: torch.device) -> bool:
    """Whether int4_tc launches with PDL on this device (tests skip without it)."""
    return mode(device) != 0


def launch(device: torch.device, small: bool = False) -> dict:
    """A kernel's launch arguments: its PDL constexpr, and `launch_pdl=True` where PDL is on."""
    m = mode(device, small)
    return {"PDL": m, "launch_pdl": True} if m else {"PDL": 0}


def launch_kwargs(device: torch.device, small: bool = False) -> dict:
    """The launch arguments without the constexpr: `launch_pdl=True` where PDL is on."""
    return {"launch_pdl": True} if mode(device, small) else {}


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel's writes are visible (PDL launches only)."""
    if PDL != 0:
        gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr, AT: tl.constexpr):
    """Let the next kernel on the stream start launching (it still waits for our writes); a
    kernel calls this at its start (AT 1) and after its main loads (AT 2)."""
    if PDL == AT:
        gdc_launch_dependents()
