"""Triggers: the async waits of the deferrable sensors (run in the triggerer)."""
