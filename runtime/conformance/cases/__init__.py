"""Conformance cases per op family. Each generator yields :class:`~dsv4rt.conformance.case.Case` objects."""
