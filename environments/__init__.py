"""Example environments (see docs/environments.md). Load them by file path, e.g.
``env.fn=environments/countdown.py:CountdownEnv``, or as ``environments.countdown``
when the repository root is on the Python path."""
