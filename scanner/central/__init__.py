"""The central side: what runs on a server, for every gate at once.

``collector`` (``gate-scanner collect``) stores every gate's check-ins once in a ``store``
(SQLite for one site, PostgreSQL for a province) and acknowledges them; ``trace`` answers a
health officer's question from that store; ``monitor`` shows operators the live state of the
gates. It talks to gates only through the broker and never imports ``scanner.gate``.
"""
