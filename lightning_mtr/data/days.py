"""Day-partitioned logs in the Hive layout: ``ROOT/dt=YYYY-MM-DD/*.parquet``.

A split given as such a root reads every partition, or only the days a selection names:
``2026-11-26..2026-11-28`` (both ends included), one day ``2026-11-28``, or a list of either
(``[2026-11-20, 2026-11-26..2026-11-28]``; on the command line also comma-separated).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from lightning_mtr.data.encode import DataError

PARTITION = "dt="
Days = str | list[str] | None


def parse_date(text: str, setting: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise DataError(f"{setting}: {text.strip()!r} is not a date; write YYYY-MM-DD, e.g. 2026-11-28") from None


def parse_days(days: Days, setting: str = "data.days") -> list[dt.date]:
    """The sorted, distinct days a selection names (a range ``A..B`` includes both ends)."""
    if days is None:
        return []
    items = [days] if isinstance(days, str) else list(days)
    if not items:  # null reads every day; an empty list would read none and fail later, unnamed
        raise DataError(f"{setting}: [] selects no day; write YYYY-MM-DD, A..B or a list of them (null: every day)")
    chosen: set[dt.date] = set()
    for item in (part for entry in items for part in str(entry).split(",")):
        if not item.strip():
            raise DataError(f"{setting}: an empty day in {days!r}; write YYYY-MM-DD, A..B or a list of them")
        first, dots, last = item.partition("..")
        start = parse_date(first, setting)
        end = parse_date(last, setting) if dots else start
        if end < start:
            raise DataError(f"{setting}: the range {item.strip()} ends before it starts; write the earlier day first")
        chosen.update(start + dt.timedelta(days=n) for n in range((end - start).days + 1))
    return sorted(chosen)


def describe(days: Sequence[dt.date]) -> str:
    """``2026-11-25..2026-11-28 (4 days)``, or the list when they are not consecutive."""
    if not days:
        return "no days"
    if (days[-1] - days[0]).days + 1 == len(days):
        return f"{days[0]}..{days[-1]} ({len(days)} day{'s' * (len(days) > 1)})"
    return ", ".join(str(day) for day in days)


def partitions(root: Path) -> dict[dt.date, Path] | None:
    """A Hive root's ``dt=`` folders by day; None when ``root`` holds none. A root that also holds
    data files or other folders, or a partition whose name is not a date, is refused."""
    if not root.is_dir():
        return None
    entries = sorted(root.iterdir())
    days = [p for p in entries if p.is_dir() and p.name.startswith(PARTITION)]
    if not days:
        return None
    others = [p.name for p in entries if p not in days and not p.name.startswith((".", "_"))]
    if others:
        raise DataError(f"{root}: mixes {PARTITION}YYYY-MM-DD partitions with {others[0]!r}"
                        f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}; keep one layout "
                        "(move the files into their day's folder)")
    found = {}
    for path in days:
        try:
            found[dt.date.fromisoformat(path.name[len(PARTITION):])] = path
        except ValueError:
            raise DataError(f"{path}: a partition folder whose name is not {PARTITION}YYYY-MM-DD") from None
    return found


def require_root(paths: str | Sequence[str] | None, split: str, setting: str) -> None:
    """A day selection needs its split's data (a Hive root)."""
    if not paths:
        raise DataError(f"{setting} is set but data.{split} is not; give data.{split} a {PARTITION}YYYY-MM-DD root")


def select(paths: str | Sequence[str] | None, days: Days, split: str, setting: str) -> list[Path]:
    """The partition folders of ``paths`` (a Hive root) for ``days``, in day order."""
    wanted = parse_days(days, setting)
    require_root(paths, split, setting)
    roots = [paths] if isinstance(paths, str) else list(paths)
    found = partitions(Path(roots[0])) if len(roots) == 1 else None
    if found is None:
        raise DataError(f"{setting} selects days, but data.{split} ({', '.join(map(str, roots))}) is not one "
                        f"directory of {PARTITION}YYYY-MM-DD folders (the Hive layout); give its root")
    missing = [day for day in wanted if day not in found]
    if missing:
        raise DataError(f"{setting}: {roots[0]} has no partition for {describe(missing)}; "
                        f"it has {describe(sorted(found))}")
    return [found[day] for day in wanted]
