"""scheduler: deployments (desired state), leader election, replica placement and healing."""
