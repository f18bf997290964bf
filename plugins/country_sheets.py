"""The demo retrieval corpus of the `countries` task: one Markdown fact sheet per country
(``distill index demo-corpus --out DIR``), generated deterministically from the countryinfo data
with the same corrections the task uses (``countries()`` in plugins/tasks.py), so a sheet and the
task's accepted answers agree. The sentences come from prompts/tasks/country_sheets.yaml; this
module only fills them in, picks a phrasing per fact and shuffles the facts, seeded by the ISO
code. A question names its sheet (``Question.sources``): that is the passage retrieval must find.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from distill_plugins.tasks import Country, _language_names, _with_article, countries, sheet_names

from distill.errors import ConfigError
from distill.runstore import write_atomic

PROVENANCE = ".corpus.json"  # hidden: the indexer skips it


@cache
def sheet_templates() -> dict[str, Any]:
    import yaml
    from distill_prompts import read_prompt

    return yaml.safe_load(read_prompt("tasks/country_sheets.yaml"))


def _listing(items: list[str]) -> str:
    """ "A", "A and B", "A, B and C"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _raw_entries() -> dict[str, dict[str, Any]]:
    """countryinfo's entries by their name (``Country.source_name`` is the name of the one kept)."""
    from countryinfo import all_countries

    return {entry.info()["name"].strip(): entry.info() for entry in all_countries() if entry.info().get("name")}


def _calling_code(country: Country) -> str | None:
    """The "+" forms, one per distinct number ("+1-876", not also "+1876")."""
    seen, forms = set(), []
    for form in country.calling_codes:
        digits = form.replace("-", "").replace(" ", "")
        if form.startswith("+") and digits not in seen:
            seen.add(digits)
            forms.append(form)
    return " or ".join(forms) or None


def sheet_facts(country: Country, raw: dict[str, Any], names: dict[str, str]) -> dict[str, str | None]:
    """The fields of one sheet (None: missing, the sentence is left out). ``names``: ISO alpha-3 →
    the country's name as the task writes it, for the neighbours."""
    the = _with_article(country.name)
    subregion = str(raw.get("subregion") or "").strip() or None
    population = raw.get("population")
    area = raw.get("area")
    neighbours = [_with_article(names[code]) for code in raw.get("borders") or [] if code in names]
    zones = [str(z) for z in raw.get("timezones") or [] if str(z).strip()]
    languages = [_language_names(code)[0] for code in country.language_codes]
    domains = [str(d) for d in raw.get("tld") or [] if str(d).strip()]
    return {
        "Name": the[:1].upper() + the[1:],
        "name": the,
        "capital": country.capital,
        "regions": _listing([f"the {r}" if r == "Americas" else r for r in country.regions])
        if country.regions
        else None,
        "subregion": subregion,
        "population": f"{int(population):,}" if isinstance(population, (int, float)) and population > 0 else None,
        "area": f"{int(area):,}" if isinstance(area, (int, float)) and area > 0 else None,
        "neighbours": _listing(neighbours) if neighbours else None,
        "currencies": _listing(country.currencies) if country.currencies else None,
        "calling_code": _calling_code(country),
        "languages": _listing(languages) if languages else None,
        "language_count": str(len(languages)),
        "zones": str(len(zones)) if zones else None,
        "first_zone": zones[0] if zones else None,
        "last_zone": zones[-1] if zones else None,
        "demonym": str(raw.get("demonym") or "").strip() or None,
        "domain": _listing(domains) if domains else None,
    }


def country_sheet(country: Country, facts: dict[str, str | None]) -> str:
    """One sheet: a heading, the opening sentence, then the known facts in a seeded order, each in
    a seeded phrasing. Deterministic: the same data always give the same text."""
    templates = sheet_templates()
    rng = random.Random(f"country-sheet:{country.code}")
    wanted = {
        "capital": "capital",
        "population": "population",
        "area": "area",
        "neighbours": "neighbours",
        "currencies": "currencies",
        "calling_code": "calling_code",
        "languages": "language" if facts["language_count"] == "1" else "languages",
        "zones": "zone" if facts["zones"] == "1" else "zones",
        "demonym": "demonym",
        "domain": "domain",
    }
    sentences = [
        rng.choice(templates["facts"][template]).format(**facts)
        for field, template in wanted.items()
        if facts[field] is not None
    ]
    rng.shuffle(sentences)
    if facts["regions"] is not None:  # where it lies opens the sheet
        opening = templates["opening"]["with_subregion" if facts["subregion"] else "without_subregion"]
        sentences.insert(0, rng.choice(opening).format(**facts))
    title = templates["title"].format(**facts)
    return f"{title}\n\n{' '.join(sentences)}\n" if sentences else f"{title}\n"


def write_country_sheets(out: Path) -> dict[str, Any]:
    """Write every country's sheet into ``out`` (one ``NAME.md`` each, see ``sheet_names``) and a
    hidden provenance file; return the provenance (files, countryinfo version, templates' sha256)."""
    every = countries()
    raw = _raw_entries()
    alpha3 = {str((raw[c.source_name].get("ISO") or {}).get("alpha3")): c.name for c in every if c.source_name in raw}
    files = sheet_names()
    if out.is_dir():  # other files would be indexed with the sheets as if they were part of the corpus
        others = sorted(p.name for p in out.iterdir() if p.name not in set(files.values()) | {PROVENANCE})
        if others:
            raise ConfigError([f"--out: {out} holds other files ({', '.join(others[:3])}...); give an empty folder"])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for country in every:
        text = country_sheet(country, sheet_facts(country, raw.get(country.source_name, {}), alpha3))
        write_atomic(out / files[country.code], text)
        written.append(files[country.code])
    from distill_prompts import read_prompt

    provenance = {
        "generator": "distill index demo-corpus (plugins/country_sheets.py)",
        "task": "countries",
        "countryinfo": metadata.version("countryinfo"),
        "templates_sha256": hashlib.sha256(read_prompt("tasks/country_sheets.yaml").encode()).hexdigest(),
        "corrections_sha256": hashlib.sha256(read_prompt("tasks/countries.yaml").encode()).hexdigest(),
        "files": len(written),
    }
    write_atomic(out / PROVENANCE, json.dumps(provenance, indent=2))
    return provenance
