"""Stand-ins for the world around a gate, for the demo, the benchmarks and the self-test.

``synth`` renders QR scenes as a camera sees them, ``localbroker`` runs a private mosquitto
on a free loopback port, ``contact`` moves a door contact on a mock pin, and ``demo`` runs the
real daemon (as a separate process) on replayed frames with mock pins and prints what an
operator would see.
"""
