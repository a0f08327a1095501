"""Helpers shared by the tests: reference kernels, initrds."""
