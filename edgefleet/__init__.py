"""edgefleet: the command line that fronts the device agent and the fleet server."""
