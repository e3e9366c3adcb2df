"""One module per runtime, each behind the `Backend` interface in `base`."""
