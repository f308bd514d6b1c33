"""Reading and writing weights: the Orbax checkpoint (`checkpoint`)."""
