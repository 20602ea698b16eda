"""gate-scanner: an unattended QR check-in gate for a Raspberry Pi."""

__version__ = "0.1.0"
