"""What an employee sees of, and does to, their own stored data, shared by the JSON routes
(``/api/v1/me/captured``, ``/me/demonstrations``, ``/me/frames``) and the employee page
(docs/design/control-plane.md, Part 3 B).

Self only, by construction: every function derives the warehouse key from the authenticated
caller's own employee id (``warehouse.employee_key``) and takes no other person's id. A
demonstration or frame that is not the caller's answers exactly like one that does not exist
(:class:`NotFound`), so nobody learns whether another person's id exists.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from handtrace.control.api import actions
from handtrace.control.api.auth import Principal
from handtrace.control.api.services import Services, Warehouse, WarehouseUnavailable, audit_entry
from handtrace.core.settings import Settings

DEMONSTRATIONS_LIMIT = 100
"""Demonstrations listed (newest first)."""
WITHDRAW_ACTION = "demonstration_withdraw"
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp"}
NOT_FOUND = "no such demonstration or frame of yours"
"""The one answer for another person's demonstration and for an unknown one."""
NO_WAREHOUSE = "no warehouse is configured (api.warehouse is off), so what is stored about you cannot be shown here"


class NotFound(LookupError):
    """Not the caller's, or does not exist (the same to the caller)."""


def warehouse(services: Services) -> Warehouse:
    """The services' warehouse; WarehouseUnavailable when none is configured."""
    if services.warehouse is None:
        raise WarehouseUnavailable(NO_WAREHOUSE)
    return services.warehouse


def my_key(settings: Settings, who: Principal) -> str:
    """The caller's own pseudonym (403 upstream when the token carries no employee id)."""
    from handtrace.control.api.warehouse import employee_key

    if who.employee_id is None:
        raise actions.Refused("no employee id in the token")
    return employee_key(settings, who.employee_id)


def day_window(day: str | None, today: date | None = None) -> tuple[date, int, int]:
    """The UTC day ``YYYY-MM-DD`` (default: today UTC) and its [since, until) in microseconds;
    actions.Invalid("day") otherwise."""
    if day is None or day == "":
        the_day = today or datetime.now(UTC).date()
    else:
        try:
            if len(day) != 10:
                raise ValueError(day)
            the_day = date.fromisoformat(day)
        except ValueError:
            raise actions.Invalid("day", "must be a date as YYYY-MM-DD (UTC)") from None
    start = datetime(the_day.year, the_day.month, the_day.day, tzinfo=UTC)
    since = int(start.timestamp()) * 1_000_000
    return the_day, since, since + int(timedelta(days=1).total_seconds()) * 1_000_000


def captured(services: Services, settings: Settings, who: Principal, day: str | None) -> dict[str, Any]:
    """What was stored about the caller on ``day`` (``Warehouse.captured`` plus ``day``)."""
    the_day, since, until = day_window(day)
    got = warehouse(services).captured(my_key(settings, who), since, until)
    return {"day": the_day.isoformat(), **got}


def demonstrations(services: Services, settings: Settings, who: Principal,
                   limit: int = DEMONSTRATIONS_LIMIT) -> list[dict[str, Any]]:
    """The caller's demonstrations, newest first."""
    return warehouse(services).demonstrations(my_key(settings, who), limit)


def withdraw(services: Services, settings: Settings, who: Principal, demonstration_id: str, reason: str, *,
             method: str = "", path: str = "") -> str:
    """Withdraw one of the caller's demonstrations from training data; exactly one audit entry
    (``demonstration_withdraw``), ``refused`` when it is not theirs or unknown (then NotFound).
    actions.Invalid("reason") for a blank or long reason (nothing recorded)."""
    reason = reason.strip()
    if not reason:
        raise actions.Invalid("reason", "is required (kept with the withdrawal and in the audit trail)")
    if len(reason) > actions.MAX_REASON_CHARS:
        raise actions.Invalid("reason", f"at most {actions.MAX_REASON_CHARS} characters")
    store = warehouse(services)
    key = my_key(settings, who)
    try:
        wid = store.withdraw(employee_key=key, demonstration_id=demonstration_id, actor=who.subject, reason=reason)
    except KeyError:
        services.audit.record(audit_entry(who, action=WITHDRAW_ACTION, target=demonstration_id[:128], reason=reason,
                                          outcome="refused", detail=NOT_FOUND, method=method, path=path))
        raise NotFound(NOT_FOUND) from None
    services.audit.record(audit_entry(who, action=WITHDRAW_ACTION, target=demonstration_id, reason=reason,
                                      outcome="allowed", before="in training data", after={"withdrawal_id": wid},
                                      method=method, path=path))
    return wid


def frame_image(services: Services, settings: Settings, who: Principal, demonstration_id: str,
                step: int) -> tuple[bytes, str]:
    """The image bytes and media type of one of the caller's frames; NotFound when it is not theirs,
    unknown, or its object is gone; WarehouseUnavailable when the store cannot be read."""
    from handtrace.core.framestore import StoreError, open_store

    meta = warehouse(services).frame(my_key(settings, who), demonstration_id, step)
    if meta is None:
        raise NotFound(NOT_FOUND)
    try:
        data = open_store(settings).get(meta["object_key"])
    except KeyError:
        raise NotFound(NOT_FOUND) from None
    except (StoreError, OSError, ValueError) as e:
        raise WarehouseUnavailable(f"the frame store could not be read: {e}") from None
    return data, MEDIA_TYPES.get(str(meta["format"]), "application/octet-stream")
