"""The object-store client for durable outputs (README, Durable outputs)."""
