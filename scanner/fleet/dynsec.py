"""The broker's access rules for mosquitto's dynamic-security plugin, one role per identity.

Why the plugin and not mosquitto's ``acl_file``: mosquitto 2.0.11 grants every SUBSCRIBE
under an ``acl_file`` and applies its read rules only when it delivers a message. A shared
subscription hands each message to one member of the group in turn, so a gate's key could
join the collectors' ``$share/collectors/…`` group: each message that came to its turn was
then denied to it and dropped for the whole group, and its persistent session went on doing
so after it disconnected. The plugin checks the SUBSCRIBE itself against the client's roles
and refuses it (MQTT v5 reason 0x87), so no gate ever becomes a member.

Why one role per gate: the plugin in 2.0 has no ``%u`` placeholder, and the site segment
must be fixed as well as the device id, or one gate could publish under invented site
names (each a new row in the collector's status, and a check-in "from" a site it is not
at). So each gate gets the literal topics of ``{prefix}/{site}/{device}/``; the site comes
from its certificate (see :mod:`scanner.fleet.pki`).

Nobody is granted ``$CONTROL``: the file this module writes is the whole truth, and a
change is a new file and a broker restart (plugins are not reloaded on SIGHUP).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scanner.mqtt import SHARE_GROUP

COLLECTOR_ROLE = "gate-scanner-collector"
OPERATOR_ROLE = "gate-scanner-operator"
# What a gate writes under its own root, and reads there (commands in, the collector's acks;
# cmd/# also covers `selftest`'s round trip on cmd/selftest/reply).
GATE_WRITES = ("availability", "status", "health", "checkin", "occupancy", "cmd/+/reply")


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True, "priority": 0}


def gate_role(device: str, site: str, prefix: str) -> dict[str, Any]:
    root = f"{prefix}/{site}/{device}"
    # The site's other gates' occupancy counts: the site shares its inside count through
    # the broker alone. A literal filter, so no `$share/…` form of it is granted.
    siblings = f"{prefix}/{site}/+/occupancy"
    return {
        "rolename": f"gate:{device}",
        "textname": f"gate {device} at {site}",
        "acls": [
            *(_acl("publishClientSend", f"{root}/{leaf}") for leaf in GATE_WRITES),
            _acl("publishClientReceive", f"{root}/ack"),
            _acl("publishClientReceive", f"{root}/cmd/#"),
            _acl("publishClientReceive", siblings),
            _acl("subscribeLiteral", f"{root}/ack"),
            _acl("subscribePattern", f"{root}/cmd/#"),
            _acl("subscribeLiteral", siblings),
        ],
    }


def collector_role(prefix: str) -> dict[str, Any]:
    return {
        "rolename": COLLECTOR_ROLE,
        "textname": "collectors: every check-in, through the collectors' shared subscription",
        "acls": [
            # Exactly the collector's own subscription: a plain `+/+/checkin` would give one
            # collector a copy of everything beside the group, which nothing needs.
            _acl("subscribeLiteral", f"$share/{SHARE_GROUP}/{prefix}/+/+/checkin"),
            _acl("publishClientReceive", f"{prefix}/+/+/checkin"),
            _acl("publishClientSend", f"{prefix}/+/+/ack"),
            _acl("publishClientSend", f"{prefix}/collector/+/status"),
        ],
    }


def operator_role(prefix: str) -> dict[str, Any]:
    return {
        "rolename": OPERATOR_ROLE,
        "textname": "operators: read everything, send commands (not replies)",
        "acls": [
            # A pattern under the prefix: `$share/…` filters start with another level, so an
            # operator cannot join the collectors' group (and take check-ins from them) either.
            _acl("subscribePattern", f"{prefix}/#"),
            _acl("publishClientReceive", f"{prefix}/#"),
            _acl("publishClientSend", f"{prefix}/+/+/cmd/+"),
        ],
    }


def rules(
    gates: Iterable[tuple[str, str]],
    *,
    collectors: Iterable[str],
    operators: Iterable[str],
    prefix: str,
) -> dict[str, Any]:
    """The plugin's JSON document: ``gates`` are (device id, site) pairs."""
    roles = [collector_role(prefix), operator_role(prefix)]
    clients = []
    for device, site in sorted(gates):
        role = gate_role(device, site, prefix)
        roles.append(role)
        clients.append(_client(device, role["textname"], role["rolename"]))
    clients += [_client(name, "collector", COLLECTOR_ROLE) for name in sorted(collectors)]
    clients += [_client(name, "operator", OPERATOR_ROLE) for name in sorted(operators)]
    return {
        # Deny what no role grants; unsubscribing from what one has is always fine.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def _client(username: str, textname: str, role: str) -> dict[str, Any]:
    # No password: the broker takes the user name from the client certificate's CN and
    # never asks the plugin to authenticate; the plugin only decides what each may do.
    return {"username": username, "textname": textname, "roles": [{"rolename": role, "priority": 0}]}
