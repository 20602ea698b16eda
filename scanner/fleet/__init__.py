"""The tools of technicians and operators, run on a laptop or on a gate by hand.

``pki`` makes the fleet's TLS certificates (and, with ``dynsec``, the broker's access rules
from them), ``provision`` a gate's first-boot bundle, ``selftest`` checks a gate on site,
``passes`` issues and verifies signed passes, and ``cmd`` signs and sends operator commands.
They use the gate's own code to check what they make.
"""
