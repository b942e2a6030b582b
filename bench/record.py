"""What every benchmark records beside its figures: the machine, and the results file."""
from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "platform": platform.platform()}


def append_result(name: str, record: dict, results: Path = RESULTS) -> Path:
    """Print the record as one JSON line and append it to results/<name>-<date>.json."""
    print(json.dumps(record))
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}-{date.today().isoformat()}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(record)
    path.write_text(json.dumps(runs, indent=2) + "\n")
    return path
