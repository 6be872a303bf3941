"""Merge the audit.csv of audits run in parts (one folder each) into one audit.md and audit.png.

An audit is one command (``python audit.py --config configs/audit_demo.yaml``); on a machine with cores to spare
its sweeps can run as parallel parts (``--audit.sweeps=[...]``, ``--report.output_dir=PART``), each with the
undefended row. This reads the parts' tables, keeps one undefended row (the first part's) and writes the merged
table and picture:

    python benchmarks/audit_merge.py OUT PART [PART ...]
"""

import argparse
import csv
import math
from pathlib import Path

from lightning_inversion import defenses
from lightning_inversion.auditing import NO_DEFENSE, SECURE_AGGREGATION, audit_markdown, plot_audit


def _value(text: str):
    if text == "":
        return None
    if text == "inf":
        return math.inf
    try:
        return float(text)
    except ValueError:
        return text


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "audit.csv", newline="") as file:
        rows = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(file)]
    for row in rows:
        kind = getattr(defenses, str(row["defense"]), None)
        row["stronger"] = kind.stronger if kind is not None else "higher"
        row["targets"] = int(row["targets"])
        if row["defense"] == SECURE_AGGREGATION:
            row["stronger"] = "higher"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", type=Path, nargs="+")
    args = parser.parse_args()
    rows, seen_none = [], False
    for part in args.parts:
        for row in read_rows(part):
            if row["defense"] == NO_DEFENSE:
                if seen_none:
                    continue
                seen_none = True
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    notes = [f"merged from {', '.join(p.name for p in args.parts)}"]
    (args.out / "audit.md").write_text(audit_markdown(rows, 12.0, notes=notes))
    plot_audit(args.out / "audit.png", rows, 12.0)


if __name__ == "__main__":
    main()
