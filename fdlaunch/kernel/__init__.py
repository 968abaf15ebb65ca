"""Thin system-call layers, one resource each: sockets, credentials, descriptors, the notify socket, exec, processes."""
