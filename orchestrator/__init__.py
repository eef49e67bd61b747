"""mmae orchestrator: the `mmae` CLI, job schema, cloud launch and the cluster-side runtime."""

__version__ = "0.1.0"
