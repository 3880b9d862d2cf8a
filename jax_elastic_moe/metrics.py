"""Prometheus metrics of one engine (prometheus-client), served over HTTP at /metrics.

Each engine has its own CollectorRegistry, so several engines (and tests) in one process never
collide. Started by Engine(..., metrics_port=PORT); port 0 picks a free port (EngineMetrics.port
is the bound one).

  jem_elastic_state{jem_elastic_state="healthy|recovering|degraded|dead"}  1 for the current state
  jem_active_ranks                      ranks taking part in the current epoch
  jem_recoveries_total                  recoveries completed (at the first good step after each)
  jem_last_interruption_seconds         last good step before the last failure -> first good step after
  jem_step_latency_seconds              histogram: time from the previous good step (or the start of
                                        generate) to the end of each good step
  jem_tokens_generated_total            output tokens produced
"""
from __future__ import annotations

STATES = ("healthy", "recovering", "degraded", "dead")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    """The engine's gauges, counters and step-latency histogram, and the HTTP server that serves them."""

    def __init__(self, num_ranks: int, port: int = 0, addr: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server
        self.num_ranks = num_ranks
        self.registry = registry = CollectorRegistry()
        self.state = Enum("jem_elastic_state", "Elastic state of the engine", states=list(STATES),
                          registry=registry)
        self.active_ranks = Gauge("jem_active_ranks", "Ranks taking part in the current epoch", registry=registry)
        self.recoveries = Counter("jem_recoveries", "Recoveries from rank failures completed", registry=registry)
        self.last_interruption = Gauge("jem_last_interruption_seconds",
                                       "Last good step before the last failure to the first good step after",
                                       registry=registry)
        self.step_latency = Histogram("jem_step_latency_seconds", "Time to each good generation step",
                                      buckets=STEP_BUCKETS, registry=registry)
        self.tokens = Counter("jem_tokens_generated", "Output tokens generated", registry=registry)
        self.state.state("healthy")
        self.active_ranks.set(num_ranks)
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port: int = self._server.server_port

    def on_step(self, latency_s: float, tokens: int):
        self.step_latency.observe(latency_s)
        self.tokens.inc(tokens)

    def on_recovering(self):
        self.state.state("recovering")

    def on_recovered(self, active_ranks: int, interruption_s: float):
        """The first good step after a failure: `active_ranks` serve (degraded when fewer than at the
        start) after an interruption of `interruption_s`."""
        self.recoveries.inc()
        self.active_ranks.set(active_ranks)
        self.last_interruption.set(interruption_s)
        self.state.state("healthy" if active_ranks == self.num_ranks else "degraded")

    def on_dead(self):
        self.state.state("dead")

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
