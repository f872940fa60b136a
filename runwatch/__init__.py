"""runwatch: watch long training runs from inside and out.

The bare install is the in-trainer agent, the wire types, the query client and
the CLI; ``runwatch[server]`` adds the collector.
"""

__version__ = "0.1.0"
