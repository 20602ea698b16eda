"""A dry contact on a gpiozero mock pin, moved the way a person or a fire panel moves it.

``selftest --simulate`` and ``bench door`` drive the door's inputs with it. A closed contact
pulls the pin to the rail opposite its pull resistor (GND under a pull-up); an open one leaves
it to the pull. ``rest`` and ``activate`` follow the contact's sense: a normally-open exit
button closes when pressed, a normally-closed fire loop opens on fire.
"""

from __future__ import annotations

from typing import Any


class SimulatedContact:
    def __init__(self, pin: Any, *, pull_up: bool, normally_closed: bool) -> None:
        self._pin = pin  # a gpiozero MockPin, claimed as an input by the device reading it
        self._closed_high = not pull_up
        self._nc = normally_closed

    def rest(self) -> None:
        """Where the contact sits with nothing happening (button up, door shut, no fire)."""
        self._set(closed=self._nc)

    def activate(self) -> None:
        """Pressed, opened, tripped."""
        self._set(closed=not self._nc)

    def _set(self, *, closed: bool) -> None:
        if closed == self._closed_high:
            self._pin.drive_high()
        else:
            self._pin.drive_low()
