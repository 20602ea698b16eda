"""The gate: everything that runs on the Raspberry Pi at the door.

The camera (``camera/``) hands frames to the decoder (``decode``), presence tracking
(``track``) turns them into scans, the shared ``credentials`` parse each scan, ``policy``
decides against the ``lists`` and the site's count, and the ``pipeline`` commits the event to
the ``outbox`` before ``signals`` drive the relay, LEDs and buzzer; ``occupancy`` counts every
committed event into the count the site's gates share through the broker. The ``publisher``
sends the outbox to the broker, ``commands`` verifies and runs operators' signed commands, ``telemetry`` and
``health`` report how the gate is doing, and ``app`` builds it all from the config and runs
it (``daemon`` is the ``run`` command). Nothing here imports the central side.
"""
