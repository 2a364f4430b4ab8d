"""The engine core: what runs in the engine core process (or its thread): scheduling, KV blocks, stepping."""
