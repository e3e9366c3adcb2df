"""The model artifact: package format and manifest, signing and verification.

Imports nothing from `device` or `fleet`.
"""
