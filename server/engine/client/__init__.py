"""The engine client: what runs in the API process (the engine core runs in core/, over a transport)."""
