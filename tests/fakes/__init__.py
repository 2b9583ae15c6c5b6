"""Fakes at the boundary: the services the dispatch backends talk to, driven by the real clients."""
