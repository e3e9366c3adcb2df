"""The hardware-aware inference engine: a probe, backends behind one interface, and the engine."""
