"""Fuzz targets (atheris-style ``TestOneInput(data)``), runnable under plain Python too."""
