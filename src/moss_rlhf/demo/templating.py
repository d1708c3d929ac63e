"""Fill-in-the-blank templates that can be both sampled and parsed back.

The demo world writes every sentence and prompt from a template such as
``"{name} took the train to {town}."``. The judge must later recognise those texts and
recover the values that were filled in, so one object does both: it samples fillings from
per-field domains and compiles itself into a regular expression whose groups are exactly
those domains. Generator and judge therefore share one definition and cannot disagree.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

Domains = Mapping[str, Sequence[str]]


def domain_key(field_name: str) -> str:
    """The domain a field draws from: ``name2`` draws from the same domain as ``name``."""
    return field_name.rstrip("0123456789")


@dataclass(frozen=True)
class Template:
    """A ``str.format`` pattern with a label (a sentiment, topic or prompt kind) and a sampling weight."""

    text: str
    label: str
    weight: float = 1.0
    domains: Domains = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.text) if name)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """Regex matching exactly the texts this template can produce.

        Fields with a domain become an alternation of its values (longest first, so
        "Stone Bay" wins over a shorter prefix); fields without one match any text and are
        validated by the caller.
        """
        parts: list[str] = []
        for literal, name, _, _ in string.Formatter().parse(self.text):
            parts.append(re.escape(literal))
            if not name:
                continue
            values = self.domains.get(domain_key(name))
            if values is None:
                parts.append(f"(?P<{name}>.+?)")
            else:
                alternatives = "|".join(re.escape(value) for value in sorted(values, key=len, reverse=True))
                parts.append(f"(?P<{name}>{alternatives})")
        return re.compile("".join(parts))

    def match(self, text: str) -> dict[str, str] | None:
        """The field values if ``text`` is exactly one of this template's fillings, else None."""
        found = self.pattern.fullmatch(text.strip())
        return found.groupdict() if found else None

    def sample_values(self, rng: random.Random, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
        """Random values for every field; fields sharing a domain get distinct values."""
        values = dict(fixed or {})
        for name in self.fields:
            if name in values:
                continue
            domain = self.domains[domain_key(name)]
            used = {value for other, value in values.items() if domain_key(other) == domain_key(name)}
            values[name] = rng.choice([value for value in domain if value not in used] if used else domain)
        return values

    def render(self, values: Mapping[str, str]) -> str:
        return self.text.format(**values)

    def sample(self, rng: random.Random) -> str:
        return self.render(self.sample_values(rng))

    def expand(self) -> Iterator[str]:
        """Every text this template can produce (used by tests to check labels exhaustively)."""
        domains = [self.domains[domain_key(name)] for name in self.fields]
        for combination in itertools.product(*domains):
            yield self.render(dict(zip(self.fields, combination)))


def pick_weighted(rng: random.Random, templates: Sequence[Template]) -> Template:
    """One template, chosen with probability proportional to its weight."""
    return rng.choices(list(templates), weights=[template.weight for template in templates], k=1)[0]
