"""Integrations with third-party packages: one module each, one extra each.

Importing ``ctxrelay`` never imports any of them.
"""
