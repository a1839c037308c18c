"""Integrations with third-party packages: one module each, one extra each.

Importing ``ctxrelay`` never imports any of them.
"""

from .._inbound import aws_trace_id

__all__ = ["aws_trace_id"]
