"""URL blocklists: documents from listed domains are removed before any other work.

Lists are UT1 style (the Université Toulouse 1 blacklists that GENIAC teams filtered mC4
with): one domain per line, ``#`` comments, usually kept as ``<category>/domains``. A document
is removed when its URL's host or any parent domain of it is listed (``ads.example.com`` is
caught by ``example.com``). Its reason names the list's category and the listed domain, so the
report counts removals per category.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter


def list_category(path: Path) -> str:
    """A list's category: its folder for UT1's ``<category>/domains``, else the file's stem."""
    return path.parent.name if path.name == "domains" and path.parent.name else path.stem


def load_domains(paths: list[Path]) -> dict[str, str]:
    """Listed domain (lower case, no leading dot or ``www.``) -> its list's category."""
    domains: dict[str, str] = {}
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as error:
            raise ValueError(
                f"domain list {path} cannot be read ({error}); fix url_blocklist"
            ) from None
        category = list_category(Path(path))
        for line in lines:
            domain = line.split("#", 1)[0].strip().lower().lstrip(".")
            if domain:
                domains.setdefault(domain.removeprefix("www."), category)
    return domains


def url_host(url: str) -> str | None:
    """The host of a URL in lower case without a trailing dot; None when there is none."""
    try:
        host = urlsplit(url if "//" in url else f"//{url}").hostname
    except ValueError:
        return None
    return host.rstrip(".") if host else None


def listed_domain(url: str, domains: Mapping[str, str]) -> str | None:
    """The listed domain that the URL's host is, or lies under; None when none is."""
    host = url_host(url)
    if not host:
        return None
    labels = host.split(".")
    for start in range(len(labels)):
        candidate = ".".join(labels[start:])
        if candidate in domains:
            return candidate
    return None


class UrlBlocklistFilter(BaseFilter):
    """Removes documents whose URL is on their source's domain lists (reason: category, domain)."""

    name = "url_blocklist"

    def __init__(
        self,
        lists_by_source: Mapping[str, list[Path]],
        url_fields: Mapping[str, str],
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        # Read when the pipeline is built, so that an unreadable list fails at once.
        by_files: dict[tuple[Path, ...], dict[str, str]] = {}
        self.domains: dict[str, dict[str, str]] = {}
        for source, paths in lists_by_source.items():
            if paths:
                key = tuple(paths)
                if key not in by_files:
                    by_files[key] = load_domains(list(paths))
                self.domains[source] = by_files[key]
        self.url_fields = dict(url_fields)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        source = doc.metadata.get("source")
        domains = self.domains.get(source)
        url = doc.metadata.get(self.url_fields.get(source, "url")) if domains else None
        if not isinstance(url, str):
            return True
        domain = listed_domain(url, domains)
        if domain is None:
            return True
        return False, f"{domains[domain]} {domain}"

    def stat_update(self, *labels: str, value: int = 1, unit: str | None = None) -> None:
        # One stat per category, not per listed domain.
        labels = tuple(
            label.split(" ", 1)[0] if label.startswith("dropped_") else label for label in labels
        )
        super().stat_update(*labels, value=value, unit=unit)
