"""Loopback stand-ins for the outside world: a simulated relay and a misbehaving receiver.

They ship in the package (not under tests/) because ``tracker demo``, the benchmarks and
apps writing their own integration tests use them too; the daemon itself never imports them.
"""
