"""The fleet server: registry, signing, update pushes, ingest, JSON API, managed broker.

Never imports `device`.
"""
