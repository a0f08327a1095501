"""Devices: the PIO/MMIO bus and everything that sits on it."""
