"""Linear layers: `make_linear` picks nn.Linear or a quantized linear for one (possibly fused)
projection.

Quantized linears keep the checkpoint's packed integers as buffers and dequantize inside the
matmul: on CUDA with the Triton kernels of kernels/quant/quant_gemm.py, elsewhere with the torch
reference (dequantize the whole weight, then F.linear), which gives bit for bit the float model a
dequantized checkpoint would give.

Loading goes through `load(name, tensor, shard)`: `shard` is (first output, number of outputs) of
a fused projection (q/k/v, gate/up), None for the whole layer; `finalize()` runs once every tensor
has arrived and fills what a format leaves implicit (symmetric zero points, trivial g_idx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.quantization import awq, compressed_tensors, cpu_int4, gguf_blocks, gptq
from hearth.engine.quantization.config import QuantConfig, UnsupportedQuantization
from hearth.engine.quantization.int_layout import (
    default_g_idx,
    dequantize_int_layout,
    pack,
    pack_factor,
    unpack,
)
from hearth.kernels import cpu_native


def make_linear(in_features: int, out_features: int, bias: bool, quant: QuantConfig | None,
                module_names: tuple[str, ...]) -> nn.Module:
    """`module_names`: the checkpoint's (HF) names of the projections fused into this one, in
    output order, e.g. ("model.layers.0.self_attn.q_proj", "...k_proj", "...v_proj")."""
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if quant.method == "gguf":
        types = {quant.gguf_types.get(name) for name in module_names}
        if len(types) != 1 or None in types:
            return nn.Linear(in_features, out_features, bias=bias)  # the loader dequantized it
        return GGUFLinear(in_features, out_features, bias, types.pop())
    ignored = [quant.is_ignored(name) for name in module_names]
    if all(ignored):
        return nn.Linear(in_features, out_features, bias=bias)
    if any(ignored):
        raise UnsupportedQuantization(f"{', '.join(module_names)} are fused in Hearth but only "
                                      "some of them are quantized in the checkpoint")
    return IntQuantLinear(in_features, out_features, bias, quant)


class QuantizedLinear(nn.Module):
    """Common interface of the quantized linears (the model's loader calls only these)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._filled: dict[str, int] = {}

    def load(self, name: str, tensor: torch.Tensor, shard: tuple[int, int] | None) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """W (out_features, in_features), float32: the reference path and tests."""
        raise NotImplementedError

    def init_dummy(self, gen: torch.Generator) -> None:
        raise NotImplementedError

    def _copy(self, key: str, buffer: torch.Tensor, piece: torch.Tensor, shard, dim: int) -> None:
        offset, size = shard if shard is not None else (0, buffer.shape[dim])
        dst = buffer.narrow(dim, offset, size)
        if dst.shape != piece.shape:
            raise ValueError(f"quantized tensor {key} has shape {tuple(piece.shape)}, expected "
                             f"{tuple(dst.shape)} (is group_size / bits in config.json right?)")
        dst.copy_(piece)
        self._filled[key] = self._filled.get(key, 0) + size

    def _check_filled(self, keys: tuple[str, ...], total: int) -> None:
        for key in keys:
            if self._filled.get(key, 0) != total:
                raise ValueError(f"checkpoint is missing quantized tensor {key!r} for a "
                                 f"{self.in_features}x{self.out_features} linear")

    def _rows(self, x: torch.Tensor, matmul) -> torch.Tensor:
        """`matmul` on x's rows as (M, in_features) → (M, out_features), back in x's leading
        shape, plus the bias: the frame every kernel path shares."""
        out = matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def frag(self) -> torch.Tensor | None:
        """The weight as mma fragment words (kernels/quant/int4_tc.py), or None."""
        return self._buffers.get("frag_words")

    def _to_frag(self, qweight: torch.Tensor, bits: int, group: int | None) -> bool:
        """On CUDA in a 16-bit model, 4-bit weights the tensor-core kernel takes are repacked
        into fragment words (kernels/quant/int4_tc.py: faster decode than the int-layout GEMV,
        docs/benchmarks.md); the caller then drops its int-layout words."""
        if not qweight.is_cuda:
            return False
        from hearth.kernels.quant import (
            int4_tc,  # Triton: imported where CUDA runs (CPU installs lack it)
        )
        from hearth.kernels.quant.int4_frag import frag_pack

        if not int4_tc.layout_supported(bits, group, self.out_features, self.in_features,
                                        self.act_dtype, qweight.device):
            return False
        words = frag_pack(unpack(qweight, 4, dim=0))  # (K, N) values → fragment words
        self.register_buffer("frag_words", words, persistent=False)
        return True

    def _frag_matmul(self, x: torch.Tensor, zeros, scales, group: int, counters,
                     offset: bool = False) -> torch.Tensor:
        from hearth.kernels.quant.int4_tc import frag_matmul

        return self._rows(x, lambda rows: frag_matmul(
            rows, self.frag, zeros, scales, group, counters=counters, offset=offset))

    def _frag_int_words(self) -> torch.Tensor:
        """The fragment words back in the int layout (K // 8, N) (dequantized_weight, tests)."""
        from hearth.kernels.quant.int4_frag import frag_unpack

        return pack(frag_unpack(self.frag), 4, dim=0)


class IntQuantLinear(QuantizedLinear):
    """AWQ, GPTQ and compressed-tensors weights, held in the int layout
    (engine/quantization/int_layout.py): qweight (K // pack, N) int32, zeros (G, N) uint8, scales
    (G, N), g_idx (K,). On CUDA, kernels/quant/quant_gemm.int_quant_matmul picks the kernel by the
    number of rows.

    On CPU the int layout is converted once at load (`_prepare_cpu`): 4-bit weights with plain
    groups in a bf16/fp16 model go to torch's int4 GEMV (engine/quantization/cpu_int4.py);
    everything else (float32, 8 bits, act-order) is dequantized into a dense weight in the model's
    dtype, the reference's numbers without dequantizing every layer at every step."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig):
        super().__init__(in_features, out_features, bias)
        group = quant.group_size or in_features
        if in_features % group and not quant.desc_act:
            raise UnsupportedQuantization(
                f"group size {group} does not divide the layer's {in_features} inputs; quantize "
                f"with a group size that does (e.g. 64 or 32 for 576 inputs)")
        pack = pack_factor(quant.bits)
        if in_features % pack or out_features % pack:
            raise UnsupportedQuantization(f"{in_features}x{out_features} linear cannot hold "
                                          f"{quant.bits}-bit weights packed {pack} per int32")
        self.quant = quant
        self.act_dtype = torch.get_default_dtype()  # the model's dtype (set while building)
        self.int4: cpu_int4.Int4Weight | None = None  # CPU, see _prepare_cpu
        self.register_buffer("dense", None, persistent=False)  # CPU, see _prepare_cpu
        num_groups = (in_features + group - 1) // group
        scale_dtype = torch.float32 if torch.get_default_dtype() == torch.float32 else torch.float16
        self.register_buffer("qweight", torch.empty(in_features // pack, out_features,
                                                    dtype=torch.int32))
        self.register_buffer("zeros", torch.empty(num_groups, out_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(num_groups, out_features, dtype=scale_dtype))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        # The decode GEMV's split-K counters (kernels/quant/int_gemv.py): zeros, left zero by
        # every call.
        self.register_buffer("split_counters", torch.empty(out_features, dtype=torch.int32),
                             persistent=False)

    def load(self, name: str, tensor: torch.Tensor, shard: tuple[int, int] | None) -> None:
        q = self.quant
        if q.method == "awq":
            pieces = awq.to_int_layout(name, tensor, q.bits)
        elif q.method == "gptq":
            pieces = gptq.to_int_layout(name, tensor, q.bits, q.gptq_v2)
        else:
            pieces = compressed_tensors.to_int_layout(name, tensor, q.bits, q.sym)
        for key, piece in pieces.items():
            if key == "g_idx":
                self._load_g_idx(piece)
            else:
                self._copy(key, getattr(self, key), piece, shard, dim=-1)

    def _load_g_idx(self, g_idx: torch.Tensor) -> None:
        if "g_idx" in self._filled and not torch.equal(self.g_idx, g_idx.to(self.g_idx.device)):
            raise UnsupportedQuantization("fused projections (q/k/v or gate/up) carry different "
                                          "g_idx; such act-order checkpoints are not supported")
        self._copy("g_idx", self.g_idx, g_idx, None, dim=0)
        self._filled["g_idx"] = self.in_features

    def finalize(self) -> None:
        n = self.out_features
        if "zeros" not in self._filled and self.quant.sym:
            self.zeros.fill_(1 << (self.quant.bits - 1))
            self._filled["zeros"] = n
        if "g_idx" not in self._filled:
            self.g_idx.copy_(default_g_idx(self.in_features, self.quant.group_size))
            self._filled["g_idx"] = self.in_features
        self._check_filled(("qweight", "zeros", "scales"), n)
        self.split_counters.zero_()
        if int(self.g_idx.max()) >= self.scales.shape[0] or int(self.g_idx.min()) < 0:
            raise ValueError("g_idx points past the scales; the checkpoint is inconsistent")
        trivial = default_g_idx(self.in_features, self.quant.group_size, self.g_idx.device)
        # The kernel computes k // group_size unless g_idx says otherwise (act-order).
        self.kernel_group_size = (self.quant.group_size or self.in_features
                                  if torch.equal(self.g_idx, trivial) else None)
        self._reserve_dequant_scratch()
        self._prepare_cpu()
        self._prepare_cuda()

    def _prepare_cuda(self) -> None:
        if self._to_frag(self.qweight, self.quant.bits, self.kernel_group_size):
            self.qweight = torch.empty(0, dtype=torch.int32, device=self.qweight.device)

    def _prepare_cpu(self) -> None:
        if self.qweight.device.type != "cpu":
            return
        if cpu_int4.supported_int(self.quant.bits, self.kernel_group_size, self.out_features,
                                  self.in_features, self.act_dtype):
            self.int4 = cpu_int4.pack_int(self.qweight, self.zeros, self.scales,
                                          self.kernel_group_size, self.act_dtype)
        else:
            self.dense = self.dequantized_weight().to(self.act_dtype)
        for name in ("qweight", "zeros", "scales", "g_idx"):  # the converted copy replaces them
            setattr(self, name, torch.empty(0, dtype=getattr(self, name).dtype))

    def dequantized_weight(self) -> torch.Tensor:
        if self.int4 is not None:
            return cpu_int4.dequantize(self.int4).float()
        if self.dense is not None:
            return self.dense.float()
        qweight = self._frag_int_words() if self.frag is not None else self.qweight
        w_t = dequantize_int_layout(qweight, self.zeros, self.scales, self.g_idx, self.quant.bits)
        return w_t.t()  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.dtype == self.int4.scale_zero.dtype:
            return self._rows(x, lambda rows: cpu_int4.linear(rows, self.int4))
        if self.dense is not None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dense.to(x.dtype), bias)
        if not x.is_cuda:
            return self._forward_reference(x)
        if self.frag is not None:
            return self._frag_matmul(x, self.zeros, self.scales, self.kernel_group_size,
                                     self.split_counters)
        from hearth.kernels.quant.quant_gemm import int_quant_matmul

        return self._rows(x, lambda rows: int_quant_matmul(
            rows, self.qweight, self.zeros, self.scales, self.g_idx, self.quant.bits,
            self.kernel_group_size, counters=self.split_counters))

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random weights with the statistics of a real checkpoint (benchmarks)."""
        self.qweight.random_(-(2**31), 2**31 - 1, generator=gen)
        self.zeros.fill_(1 << (self.quant.bits - 1))
        self.scales.uniform_(0.02 / (1 << self.quant.bits), 0.04 / (1 << self.quant.bits),
                             generator=gen)
        self.g_idx.copy_(default_g_idx(self.in_features, self.quant.group_size))
        self.kernel_group_size = self.quant.group_size or self.in_features
        self.split_counters.zero_()
        if self.bias is not None:
            self.bias.data.zero_()
        self._reserve_dequant_scratch()
        self._prepare_cpu()
        self._prepare_cuda()

    def _reserve_dequant_scratch(self) -> None:
        """Large batches dequantize W into one buffer that all layers share
        (kernels/quant/int_mma.py): sized to the largest layer before the first forward, it is
        allocated once."""
        if self.qweight.is_cuda:
            from hearth.kernels.quant.int_mma import reserve_dequant_scratch

            reserve_dequant_scratch(self.in_features * self.out_features)


class GGUFLinear(QuantizedLinear):
    """llama.cpp block-quantized weight, raw: qweight (N, row_bytes) uint8
    (engine/quantization/gguf_blocks.py).

    On CPU in bf16/fp16, Q4_0/Q4_1 weights are repacked once for torch's int4 GEMV
    (engine/quantization/cpu_int4.py) and the raw bytes are released: decode reads 4-bit weights,
    as llama.cpp does. In a float32 model with the native CPU kernels (`native`,
    EngineConfig.cpu_native) they are repacked for those instead (kernels/cpu_native.py). Else
    in float32 the CPU path stays the exact reference (dequantize, F.linear), unless
    `gemv_dtype` is bf16 (EngineConfig.cpu_bf16_gemv): then the GEMV takes the rows rounded to
    bf16, and prompts multiply the dequantized layer in float32.
    On CUDA, every type is repacked exactly into the int layout at load (gguf_blocks.to_int_layout:
    Q4_1 and Q4_K as q s + b) and runs on the int kernels (decode GEMV, int_mma, dequantized
    copy), much faster at decode than reading the blocks in place (kernels/quant/gguf_gemm.py;
    docs/benchmarks.md)."""

    INT_BUFFERS = ("int_qweight", "int_zeros", "int_scales", "int_g_idx", "int_counters")

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: str) -> None:
        super().__init__(in_features, out_features, bias)
        self.qtype = qtype
        self.act_dtype = torch.get_default_dtype()  # the model's dtype (set while building)
        # the CPU int4 GEMV's input dtype: bf16 in a float32 model with EngineConfig.cpu_bf16_gemv
        self.gemv_dtype = self.act_dtype
        # a float32 CPU model with the native kernels (kernels/cpu_native.py): Q4 rows repacked
        # for them at load
        self.native = False
        self.int4: cpu_int4.Int4Weight | None = None
        self.register_buffer("qweight", torch.empty(
            out_features, gguf_blocks.row_bytes(qtype, in_features), dtype=torch.uint8))

    def load(self, name: str, tensor: torch.Tensor, shard: tuple[int, int] | None) -> None:
        if name != "qweight":
            raise ValueError(f"unexpected GGUF tensor {name!r} for a quantized linear")
        self._copy("qweight", self.qweight, tensor, shard, dim=0)

    def finalize(self) -> None:
        self._check_filled(("qweight",), self.out_features)
        self._prepare()

    def _prepare(self) -> None:
        if self.qweight.is_cuda and self.qtype in gguf_blocks.INT_LAYOUT_TYPES:
            qweight, zeros, scales, _, group, _ = gguf_blocks.to_int_layout(
                self.qweight, self.qtype, self.in_features)
            g_idx = default_g_idx(self.in_features, group, qweight.device)
            counters = torch.zeros(self.out_features, dtype=torch.int32, device=qweight.device)
            bits = gguf_blocks.INT_LAYOUT_TYPES[self.qtype][1]
            if self._to_frag(qweight, bits, group):  # 4-bit types in a 16-bit model
                qweight = torch.empty(0, dtype=torch.int32, device=qweight.device)
            for name, t in zip(self.INT_BUFFERS, (qweight, zeros, scales, g_idx, counters)):
                self.register_buffer(name, t, persistent=False)
            self.qweight = torch.empty(0, dtype=torch.uint8, device=qweight.device)
            return
        if self.native_rows:  # the native kernels' layout (kernels/cpu_native.py)
            self.qweight = cpu_native.q4_repack(self.qweight, self.qtype, self.in_features)
            return
        if self.qweight.device.type != "cpu" or not cpu_int4.supported(
                self.qtype, self.out_features, self.in_features, self.gemv_dtype):
            return
        self.int4 = cpu_int4.pack_gguf(self.qweight, self.qtype, self.in_features, self.gemv_dtype)
        self.qweight = torch.empty(0, dtype=torch.uint8)  # the packed copy is the weight now

    @property
    def native_rows(self) -> bool:
        """Whether the native CPU kernels multiply this weight (EngineConfig.cpu_native): then
        `qweight` holds the native rows (cpu_native.q4_repack) once the weights are in."""
        return (self.native and self.qweight.device.type == "cpu"
                and cpu_native.supported(self.qtype, self.in_features))

    @property
    def int_layout(self) -> tuple[torch.Tensor, ...] | None:
        """(qweight, zeros, scales, g_idx, split counters) of the int layout, or None. With
        fragment words (`frag`), qweight is empty and the rest is shared with them."""
        if "int_qweight" not in self._buffers:
            return None
        return tuple(self._buffers[name] for name in self.INT_BUFFERS)

    @property
    def offset(self) -> bool:
        """Whether the int layout holds w = q s + b (Q4_1, Q4_K)."""
        return self.int_layout is not None and gguf_blocks.INT_LAYOUT_TYPES[self.qtype][2]

    def dequantized_weight(self) -> torch.Tensor:
        if self.native_rows:
            return cpu_native.q4_dequantize(self.qweight, self.in_features)
        if self.int4 is not None:
            return cpu_int4.dequantize(self.int4).float()
        if self.int_layout is not None:
            _, bits, offset = gguf_blocks.INT_LAYOUT_TYPES[self.qtype]
            qweight, zeros, scales, g_idx, _ = self.int_layout
            if self.frag is not None:
                qweight = self._frag_int_words()
            return dequantize_int_layout(qweight, zeros, scales, g_idx, bits, offset).t()
        return gguf_blocks.dequantize(self.qweight, self.qtype, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.native_rows:
            return self._rows(x, self._native_matmul)
        if self.int4 is not None and x.dtype == self.act_dtype:
            return self._rows(x, lambda rows: cpu_int4.linear(rows, self.int4))
        layout = self.int_layout
        if layout is None or not x.is_cuda:
            return self._forward_reference(x)
        from hearth.kernels.quant.quant_gemm import int_quant_matmul

        qweight, zeros, scales, g_idx, counters = layout
        group, bits, offset = gguf_blocks.INT_LAYOUT_TYPES[self.qtype]
        if self.frag is not None:
            return self._frag_matmul(x, zeros, scales, group, counters, offset)
        return self._rows(x, lambda rows: int_quant_matmul(
            rows, qweight, zeros, scales, g_idx, bits, group, counters=counters, offset=offset))

    def _native_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """A few rows (decode, verification) through the native GEMV on the native rows; many
        (prompts) through the layer dequantized, where compute rather than bytes dominates."""
        if rows.shape[0] <= cpu_native.GEMV_MAX_ROWS:
            return cpu_native.q4_matmul(rows, self.qweight, self.out_features)
        return F.linear(rows, self.dequantized_weight())

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random quants with small float16 scales (d, and m / dmin) in every block."""
        block, size = gguf_blocks.BLOCKS[self.qtype]
        self.qweight.random_(0, 256, generator=gen)
        blocks = self.qweight.view(self.out_features, -1, size)
        scale = torch.tensor([0.001], dtype=torch.float16).view(torch.uint8).to(blocks.device)
        for at in gguf_blocks.SCALE_BYTES[self.qtype]:
            blocks[..., at:at + 2] = scale
        if self.bias is not None:
            self.bias.data.zero_()
        self._prepare()
