"""The management plane: store, placement, orchestration, API, dashboard and alerts."""
