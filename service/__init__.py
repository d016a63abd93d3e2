"""runcomfy-gateway: an internal gateway in front of RunComfy's Hunyuan video-to-video model."""
