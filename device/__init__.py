"""The on-device agent: engine, pipeline, updater, link to the fleet and local API.

Never imports `fleet`.
"""
