"""Peak memory and speed of each built-in importer at two input sizes.

For every (format, size) this writes a synthetic export with
``tests/generate_exports.py`` into a temporary directory, then runs a fresh
Python subprocess that builds the source, restarts the RSS high-water mark
(Linux ``/proc/self/clear_refs``), takes ``ru_maxrss`` as the baseline right
before reading, iterates ``source.read()`` to the end without keeping anything,
and reports its peak RSS (``ru_maxrss``) and the time spent reading. Nothing is
published: this is the parser alone.

"Growth" is peak minus baseline. A streaming importer has about the same
growth at 1,000,000 messages as at 100,000, so the last column
(growth / growth at the smallest size) stays near 1; a parser that keeps
every message would show about 10. Growth under 1 MiB is noise: "flat" when
both sizes are under it, ">=x" (against 1 MiB) when only the smaller one is.

    .venv/bin/python bench/bench_import_memory.py
    .venv/bin/python bench/bench_import_memory.py --sizes 10000,100000 --formats whatsapp,jsonl

Formats: whatsapp (the .txt), whatsapp-zip (the same text zipped, as the
phone exports it), slack (workspace .zip), telegram (result.json), jsonl, csv,
whatsapp-history (a mautrix-whatsapp SQLite database, one row per message).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# bench format -> (connector name, generate_exports writer name)
FORMATS = {
    "whatsapp": ("whatsapp", "whatsapp"),
    "whatsapp-zip": ("whatsapp", "whatsapp"),
    "slack": ("slack", "slack"),
    "telegram": ("telegram", "telegram"),
    "jsonl": ("jsonl", "jsonl"),
    "csv": ("csv", "csv"),
    "signal-export": ("signal-export", "signal-export"),
    "signal-backup": ("signal-backup", "signal-backup"),
    "signal-backup-v2": ("signal-backup-v2", "signal-backup-v2"),
    "whatsapp-history": ("whatsapp-history", "whatsapp-history"),
}
# The test passphrase of tests/signal_backup_writer.py (generated backups only).
SIGNAL_TEST_PASSPHRASE = "123451234512345123451234512345"
SIGNAL_TEST_RECOVERY_KEY = "dtjs858asj6tv0jzsqrsmj0ubp335pisj98e9ssnss8myoc08drhtcktyawvx45l"
DEFAULT_FORMATS = "whatsapp,whatsapp-zip,slack,telegram,jsonl"
DEFAULT_SIZES = "100000,1000000"
MIB = 1024 * 1024
# Growth under this many MiB is allocator / page noise: ratios of it mean nothing.
NOISE_MIB = 1.0


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: restart the RSS high-water mark (and so ru_maxrss) from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the child: one (format, size), fresh interpreter ------------------------------


def child(connector: str, path: str) -> None:
    import gc

    from connectors.source import Rejected, available
    from topics.records import NetworkMessage

    source = available()[connector](Path(path))
    gc.collect()
    # Baseline: ru_maxrss right before reading. Where the kernel allows it the high-water
    # mark is restarted first, so the baseline is the RSS now (after imports) and an
    # import-time spike cannot hide growth while reading; elsewhere it is the peak so far.
    reset = _reset_peak_rss()
    baseline = _maxrss_bytes()
    baseline_current = _current_rss_bytes()
    if baseline_current is not None and baseline > baseline_current + 4 * MIB:
        print(
            f"warning: ru_maxrss before reading ({baseline / MIB:.1f} MiB) is above the "
            f"current RSS ({baseline_current / MIB:.1f} MiB): growth may be understated",
            file=sys.stderr,
        )
    messages = items = rejected = 0
    started = time.perf_counter()
    for item in source.read():
        items += 1
        if isinstance(item, NetworkMessage):
            messages += 1
        elif isinstance(item, Rejected):
            rejected += 1
    seconds = time.perf_counter() - started
    peak = _maxrss_bytes()
    print(
        json.dumps(
            {
                "messages": messages,
                "items": items,
                "rejected": rejected,
                "seconds": seconds,
                "baseline_rss": baseline,
                "peak_reset": reset,
                "baseline_current_rss": baseline_current,
                "peak_rss": peak,
                "end_current_rss": _current_rss_bytes(),
            }
        )
    )


# --- the parent: generate, measure, tabulate ---------------------------------------


def generate(fmt: str, size: int, folder: Path) -> Path:
    """The export for (fmt, size), written by tests/generate_exports.py in a subprocess.

    A subprocess keeps this parent small: a child's ru_maxrss can start from its
    parent's peak (vfork + exec), which would then hide the child's own growth.
    """
    _, writer = FORMATS[fmt]
    if fmt == "whatsapp-zip":
        # generate_exports has no zip writer: zip its .txt like the phone's export does.
        text = generate("whatsapp", size, folder)
        path = folder / f"whatsapp-{size}.zip"
        if not path.exists():
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(text, arcname=text.name)  # streamed in chunks by zipfile
        return path
    target = folder / f"{fmt}-{size}"
    target.mkdir(parents=True, exist_ok=True)
    existing = [p for p in target.rglob("*") if p.is_file()]
    if existing:  # whatsapp and whatsapp-zip share the text export
        return existing[0]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "generate_exports.py"),
            writer,
            str(size),
            str(target),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def measure(fmt: str, path: Path) -> dict:
    connector, _ = FORMATS[fmt]
    env = {
        **os.environ,
        "SIGNAL_BACKUP_PASSPHRASE": SIGNAL_TEST_PASSPHRASE,
        "SIGNAL_RECOVERY_KEY": SIGNAL_TEST_RECOVERY_KEY,
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", connector, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{fmt} {path}: child failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def table(rows: list[dict], sizes: list[int]) -> str:
    smallest = _size_label(min(sizes))
    head = (
        "format",
        "size",
        "messages",
        "seconds",
        "msgs/s",
        "base MiB",
        "peak MiB",
        "growth MiB",
        f"growth/{smallest}",
    )
    lines = []
    growth_at_smallest: dict[str, float] = {}
    for r in rows:
        growth = (r["peak_rss"] - r["baseline_rss"]) / MIB
        if r["size"] == min(sizes):
            growth_at_smallest[r["format"]] = growth
        base = growth_at_smallest.get(r["format"])
        if base is None:
            ratio = "n/a"
        elif base < NOISE_MIB and growth < NOISE_MIB:
            ratio = "flat"  # both within ru_maxrss / allocator noise
        elif base < NOISE_MIB:
            ratio = f">={growth / NOISE_MIB:.1f}"  # floored denominator: a lower bound
        else:
            ratio = f"{growth / base:.2f}"
        lines.append(
            (
                r["format"],
                _size_label(r["size"]),
                f"{r['messages']:,}",
                f"{r['seconds']:.1f}",
                f"{r['messages'] / r['seconds']:,.0f}" if r["seconds"] else "-",
                f"{r['baseline_rss'] / MIB:.1f}",
                f"{r['peak_rss'] / MIB:.1f}",
                f"{growth:.1f}",
                ratio,
            )
        )
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def fmt_row(cells: tuple) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i]))
        return "  ".join(out)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(head), rule, *map(fmt_row, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"default {DEFAULT_SIZES}")
    parser.add_argument(
        "--formats",
        default=DEFAULT_FORMATS,
        help=f"comma list of {', '.join(FORMATS)} (default {DEFAULT_FORMATS})",
    )
    parser.add_argument(
        "--workdir", help="keep the generated exports here (reused on the next run)"
    )
    parser.add_argument("--child", nargs=2, metavar=("CONNECTOR", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(*args.child)
        return 0

    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not sizes:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")

    tmp = None
    if args.workdir:
        folder = Path(args.workdir)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="backflow-bench-")
        folder = Path(tmp.name)

    rows: list[dict] = []
    try:
        for fmt in formats:
            for size in sizes:
                started = time.perf_counter()
                path = generate(fmt, size, folder)
                gen_s = time.perf_counter() - started
                mib = path.stat().st_size / MIB
                print(
                    f"# {fmt} {size}: {path.name} {mib:.0f} MiB (generated in {gen_s:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                result = measure(fmt, path)
                result.update(format=fmt, size=size)
                if result["rejected"]:
                    print(f"#   {result['rejected']} rejected items", file=sys.stderr)
                print(
                    f"#   read {result['messages']} messages in {result['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(result)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; RSS from ru_maxrss in a "
        "fresh child per row; growth = peak - baseline (RSS after imports, right before read())"
    )
    print(table(rows, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
