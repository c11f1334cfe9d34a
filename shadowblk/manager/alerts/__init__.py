"""Alerts: rules over the fleet, an engine that deduplicates and resolves, and delivery to the
log and to webhooks in Alertmanager's format (docs/monitoring.md)."""
