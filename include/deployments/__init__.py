"""The data and the web app behind the Deployments page (read-only over the ledgers)."""
