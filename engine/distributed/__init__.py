"""Tensor parallelism over a few local processes (one per GPU, or gloo processes on CPU).

- communicator.py: the collectives (all_reduce, all_gather, broadcast) behind a small interface.
- partition.py: which heads, KV heads, MLP columns and vocabulary rows a rank holds (no torch).
- shard_weights.py: the checkpoint's tensors cut to one rank's share as they stream in.
- parallel_layers.py: row-parallel all-reduce, vocab-parallel embedding and LM head.
- tp_runner.py: rank 0's runner (broadcasts each step's inputs) and the workers' step loop.
- workers.py: worker processes started, supervised and stopped by the engine.

With tensor_parallel_size 1 none of this is imported: the single-process path is unchanged.
"""
