"""tracker: batch-polls AI relays for task status and delivers signed webhooks."""
