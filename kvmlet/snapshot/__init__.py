"""Snapshots: the state file format (``format``); saving and restoring a machine come with the snapshot issue."""
