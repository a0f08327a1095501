"""Live migration of a running VM to another kvmlet, pre-copy over a checksummed stream (docs/migration.md).

``params`` (the API's request models, addresses), ``stream`` (the wire format, connections, TLS), ``pages``
(which pages travel and how), ``source`` (the sending side), ``destination`` (the receiving side),
``status`` (progress and the final report), ``control`` (what the API server and the CLI call), ``cli``
(``kvmlet migrate``).
"""
