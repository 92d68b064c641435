"""Adapter slots on the device and the cache that fills them."""
