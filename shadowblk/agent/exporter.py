"""The agent's Prometheus endpoint: `GET /metrics` of its AgentMetrics, in a daemon thread."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app

from shadowblk.agent.hosting import Endpoint
from shadowblk.agent.metrics import AgentMetrics, registry


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape: Prometheus scrapes every few seconds."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_metrics(listen: Endpoint, metrics: AgentMetrics) -> str:
    """Serve METRICS at LISTEN (port 0: any free port) until the process ends; its URL."""
    server = make_server(
        listen.host, listen.port, make_wsgi_app(registry(metrics)), handler_class=_Quiet
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return f"http://{listen.with_port(server.server_port)}/metrics"
