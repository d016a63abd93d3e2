"""Webhooks: Standard Webhooks signing, the callback URL guard and delivery attempts."""
