"""The engines: where a gate's turns, dedup marks and mailboxes are kept.

``base`` declares the contract every engine keeps; ``memory`` is the default
(one process); ``redis`` and ``postgres`` are packages that import their drivers
when first used. Nothing in here imports the gate or a feature above it.
"""
