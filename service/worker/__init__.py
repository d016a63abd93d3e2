"""The worker: submitter, poller and webhook dispatcher loops and their lifecycle."""
