"""KV tiers below the device's prefix cache: host RAM (`--kv-offload-gib`) and disk
(`--prefix-cache-dir`), behind the block manager's hooks. See prefix_store.py for the flow."""
