"""Named API keys (keys file, hashed), per-key quotas and concurrency, the request gate and the
audit log. The routes never see a key: the gate (an ASGI middleware) checks it before them."""
