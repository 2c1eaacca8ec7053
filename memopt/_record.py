"""What `memopt.apply` did to a model: every layer touched and every layer skipped, with the reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

_ATTR = "_memopt_applied"  # on the root module; a plain attribute, so state_dict keys do not change


@dataclass(frozen=True)
class Entry:
    """One line of the record: `technique` was `status` ("applied" or "skipped") on module `fqn`."""

    technique: str
    fqn: str
    status: str
    detail: str


@dataclass
class Applied:
    """What memopt did to a model, as returned by `memopt.applied(model)`.

    `entries` holds one `Entry` per module touched or skipped; `configs` the config each technique ran with.
    `str(applied)` prints it as a table.
    """

    entries: list[Entry] = field(default_factory=list)
    configs: dict[str, Any] = field(default_factory=dict)

    def touched(self, technique: str | None = None) -> dict[str, str]:
        """FQN -> detail of the modules `technique` (or any technique) changed."""
        return {e.fqn: e.detail for e in self.entries if e.status == "applied" and technique in (None, e.technique)}

    def skipped(self, technique: str | None = None) -> dict[str, str]:
        """FQN -> reason for the modules `technique` (or any technique) considered and left alone."""
        return {e.fqn: e.detail for e in self.entries if e.status == "skipped" and technique in (None, e.technique)}

    def replace(self, technique: str, entries: list[Entry], config: Any) -> None:
        """Swap in a technique's entries (its sub-entries, "technique:detail", go with it)."""
        self.entries = [e for e in self.entries if e.technique.split(":")[0] != technique] + entries
        if config is None:
            self.configs.pop(technique, None)
        else:
            self.configs[technique] = config

    def set(self, technique: str, fqn: str, status: str, detail: str) -> None:
        """Add or update the entry of (technique, fqn): what a forward found out after `apply`."""
        entry = Entry(technique, fqn, status, detail)
        for i, e in enumerate(self.entries):
            if e.technique == technique and e.fqn == fqn:
                self.entries[i] = entry
                return
        self.entries.append(entry)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries], "configs": {k: repr(v) for k, v in self.configs.items()}}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __str__(self) -> str:
        if not self.entries:
            return "memopt: nothing applied"
        rows = [("technique", "module", "status", "detail")]
        rows += [(e.technique, e.fqn or "<root>", e.status, e.detail) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows
        )


def record_of(model: nn.Module, create: bool = False) -> Applied:
    rec = model.__dict__.get(_ATTR)
    if rec is None:
        rec = Applied()
        if create:
            model.__dict__[_ATTR] = rec
    return rec
