"""BlockIO: copies whole KV blocks between the device cache and host memory, as raw bytes.

One block's payload is the K and V of every layer, in the cache's own dtype, viewed as bytes:

    payload (num_layers, 2, block_size, num_kv_heads, head_dim * itemsize)  uint8, flattened

Bytes, not values, so an fp8 cache (a dtype that torch's indexing does not take everywhere) moves
like any other and the disk holds exactly what the device held. On CUDA the device-to-host copy is
enqueued on the current stream, behind the forward passes that wrote the blocks, into pinned
memory; `HostBlocks.wait()` is for the thread that reads it (the disk writer), never the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hearth.engine.kv_cache import LayerKVCache


@dataclass
class HostBlocks:
    """Blocks copied to host memory: row i is the payload of the i-th block asked for."""

    data: torch.Tensor  # (num_blocks, block_nbytes) uint8 on the host
    ready: torch.cuda.Event | None = None  # None: the copy is done already (CPU)

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.data


class BlockIO:
    def __init__(self, kv_caches: list[LayerKVCache]) -> None:
        # (num_blocks, block_size, num_kv_heads, head_dim * itemsize) uint8 views, key and value
        self._raw = [(layer.key.view(torch.uint8), layer.value.view(torch.uint8))
                     for layer in kv_caches]
        key = self._raw[0][0]
        self.device = key.device
        self._block_shape = (len(self._raw), 2, *key.shape[1:])
        self.block_nbytes = key[0].numel() * 2 * len(self._raw)

    def save(self, block_ids: list[int]) -> HostBlocks:
        """Copy the blocks to the host (ordered after the work already enqueued on the device)."""
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim * itemsize)
        gathered = torch.stack([torch.stack((k.index_select(0, index), v.index_select(0, index)),
                                            dim=1) for k, v in self._raw], dim=1)
        flat = gathered.reshape(len(block_ids), self.block_nbytes)
        if self.device.type != "cuda":
            return HostBlocks(flat)
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return HostBlocks(host, ready)

    def load(self, block_ids: list[int], payloads: list[torch.Tensor]) -> None:
        """Write host payloads into the device blocks `block_ids` (before the next forward)."""
        if not block_ids:
            return
        if self.device.type == "cuda":
            data = _device_rows(payloads, self.device, self.block_nbytes)
        else:
            data = torch.stack(payloads)  # (num_blocks, block_nbytes) uint8
        data = data.view(len(block_ids), *self._block_shape)
        index = torch.tensor(block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        for layer, (key, value) in enumerate(self._raw):
            key.index_copy_(0, index, data[:, layer, 0])
            value.index_copy_(0, index, data[:, layer, 1])


def _device_rows(payloads: list[torch.Tensor], device: torch.device, nbytes: int) -> torch.Tensor:
    """(n, nbytes) on `device`: a view when the payloads are consecutive rows of one device
    buffer (disk hits staged in order), else each row copied in (pinned host-tier rows
    asynchronously; no host-side gather)."""
    first = payloads[0]
    if first.device == device and first.dim() == 1 and first.numel() == nbytes:
        base = first.as_strided((len(payloads), nbytes), (nbytes, 1))
        if all(p.device == device and p.data_ptr() == first.data_ptr() + i * nbytes
               for i, p in enumerate(payloads)):
            return base
    data = torch.empty((len(payloads), nbytes), dtype=torch.uint8, device=device)
    for row, payload in zip(data, payloads, strict=True):
        row.copy_(payload, non_blocking=True)
    return data
