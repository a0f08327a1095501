"""Legacy PC devices on the I/O-port bus: the 16550A UART and its consoles, the i8042, debug exit, port 0x80.

Nothing is re-exported here so that importing one device does not import the others (start-up time matters).
"""
