"""The demo mesh's three services; ``protomesh service <name>`` dispatches through SERVICES."""

from __future__ import annotations

from collections.abc import Callable

from demo.services import orders, products, users

SERVICES: dict[str, Callable[[list[str] | None], int]] = {
    "users": users.main,
    "orders": orders.main,
    "products": products.main,
}
