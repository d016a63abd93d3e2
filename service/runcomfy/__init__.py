"""RunComfy Model API: the upstream client and the built-in emulator."""
