"""Quantized weights: the formats Hearth reads (AWQ, GPTQ, compressed-tensors, GGUF blocks) and
their unpacking references. `hearth quantize`'s algorithms live in appliance/tools/quantizer/.

    config.py              QuantConfig from config.json's quantization_config (or a GGUF)
    int_layout.py          int32 packing of 4/8-bit values; the "int layout" kernels read
    awq.py, gptq.py,       per format: checkpoint tensors → int layout, dequantize reference,
    compressed_tensors.py  writer
    gguf_blocks.py         llama.cpp blocks: sizes, torch dequantize reference, int-layout repack
    cpu_int4.py            4-bit weights in torch's CPU int4 GEMV layout (bf16/fp16 decode)

Pure torch: the Triton kernels (hearth.kernels) read these layouts but import none of this code.
"""

from hearth.engine.quantization.config import (
    QuantConfig,
    UnsupportedQuantization,
    parse_quantization_config,
)

__all__ = ["QuantConfig", "UnsupportedQuantization", "parse_quantization_config"]
