"""kvmlet's HTTP API on a Unix socket, compatible with Firecracker's.

``controller`` (the VMM the API drives: configuration before boot, the machine after), ``routes`` (the
endpoints), ``server`` (HTTP/1.1 with h11 on the event loop), ``metrics`` (JSON lines and Prometheus),
``serve`` (``kvmlet serve``), ``firecracker`` (``kvmlet-firecracker``: Firecracker's command line),
``openapi.json`` (the API's description, served at ``GET /openapi.json``).
"""
