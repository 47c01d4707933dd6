"""The OpenAI-compatible reverse proxy that gives any chat client long-term memory."""
