"""The policy engine: anomalies in, commands out, as a YAML policy says.

:mod:`.model` is the file format, :mod:`.engine` the decisions.
"""
