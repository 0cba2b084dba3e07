"""The server's own routes: readiness (``/health``, ``/ping``) and ``/version``."""
