"""Data parallelism: engine replicas (one per GPU) behind one engine-shaped front.

- router.py: picks a replica per request: the one whose prefix cache holds the longest run of the
  prompt's blocks, else the one with the least outstanding work (no torch).
- replicated_engine.py: ReplicatedEngine, the Engine contract over N LLMEngines stepped together.
"""
