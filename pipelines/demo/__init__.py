"""The demo job's own data: generated scenes with exact captions, a loopback image server, a noisy pool."""
