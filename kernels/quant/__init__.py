"""Quantized matmuls: x @ W^T with W kept 4/8-bit, dequantized inside the kernels.

    quant_gemm.py   int layout (AWQ / GPTQ / compressed-tensors, GGUF repacked): path by M;
                    the shared launcher and `dequantized_matmul_ref`, the reference of them all
    int_gemv.py     decode GEMV (M <= 16), split-K reduced in-kernel
    int_mma.py      M > 16: tiles unpacked in registers + tl.dot, or a dequantized copy + cuBLAS
    int4_frag.py    4-bit weights as mma fragment words: packing, tiles, dequantized copy
    int4_tc.py      tensor-core decode on fragment words; `frag_matmul` picks the path by M
    gguf_gemm.py    GGUF blocks read in place (benchmarks, a GPU check of the block formats)

The weight formats themselves (packing, dequantization in torch) are hearth.engine.quantization;
nothing here imports them.
"""
