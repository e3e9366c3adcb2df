"""Fleet-side errors, split by who is at fault."""


class FleetError(Exception):
    """Base class of every fleet-side error."""


class BrokerError(FleetError):
    """The managed Mosquitto could not be started or stopped; the message holds its log tail."""


class NotFound(FleetError):
    """An operator named a device, model or update the fleet does not know."""


class Conflict(FleetError):
    """An operator asked for something that contradicts what the fleet already holds."""


class InvalidRequest(FleetError):
    """An operator's request that cannot be carried out as given; the message says why."""
