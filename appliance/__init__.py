"""The server process: settings, the async bridge to the engine, the serving layer, the HTTP API,
its metrics, and the tool commands beside it (appliance/tools)."""
