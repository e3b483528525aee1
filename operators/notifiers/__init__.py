"""Notifiers: Slack messages of deploy and rollback runs."""
