"""Transfer benchmark: this project's downloader vs OpenSSH sftp, scp, rsync and Airflow's SFTPHook defaults.

All tools pull the same files from the same loopback OpenSSH server (tests/stand_ins/sshd.py) in one run,
with a warm page cache, alternating tools between repetitions; the median is reported. Our downloader is
timed twice: the transfer phase including verification against the box's sha256 (``transfer.seconds``
of the record) and end to end (listing, sha256sum on the box, transfer, verification, store manifest).
Then a resume measurement: the SSH session is killed when half of the 200 MB file has arrived, the
download is run again, and the bytes re-sent are compared with the bytes already received.

    .venv/bin/python -m bench.transfer.run [--sizes 200,1000] [--reps 3] [--out bench/results/transfer.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    """Run the benchmark and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000", help="file sizes in MB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hook-reps", type=int, default=1, help="repetitions of the (slow) SFTPHook")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "transfer.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tests.stand_ins.sshd import start_sshd

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    server = start_sshd(work / "sshd")
    try:
        result = run(server, work, [int(s) for s in args.sizes.split(",")], args.reps, args.hook_reps)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def run(server: Any, work: Path, sizes: list[int], reps: int, hook_reps: int) -> dict[str, Any]:
    """Measure every tool on every size, then the resume fraction."""
    from include.source.endpoint import CIPHERS, SSHEndpoint, ssh_command

    endpoint = SSHEndpoint(host="127.0.0.1", port=server.port, user=server.user, key_file=str(server.client_key),
                           host_key=server.host_key_line)
    os.environ["AIRFLOW_CONN_BENCH_SSH"] = server.airflow_conn()
    hook_conn = json.loads(server.airflow_conn())
    hook_conn["extra"].pop("compress")  # SFTPHook defaults: compression on
    os.environ["AIRFLOW_CONN_BENCH_SSH_DEFAULTS"] = json.dumps(hook_conn)
    rows: dict[str, dict[str, Any]] = {}
    with ssh_command(endpoint) as ssh_argv:
        # Same keys and host key check for the OpenSSH tools, but their default ciphers and port/user syntax.
        opts = _drop_option_pairs(ssh_argv[1:], "-p", "-l", f"Ciphers={CIPHERS}")
        dest = work / "dest"
        for size_mb in sizes:
            box = work / f"box-{size_mb}"
            remote = _make_checkpoint(box, size_mb)
            tools: dict[str, Callable[[], float]] = {
                "lora-deploy (auto: rsync), transfer+verify": lambda b=box: _ours(endpoint, b, work, "auto")[0],
                "lora-deploy (sftp), transfer+verify": lambda b=box: _ours(endpoint, b, work, "sftp")[0],
                "lora-deploy (auto: rsync), end to end": lambda b=box: _ours(endpoint, b, work, "auto")[1],
                "OpenSSH sftp": lambda r=remote: _cli(["sftp", "-q", "-P", str(server.port), *opts,
                                                       f"{server.user}@127.0.0.1:{r}", str(dest)], dest),
                "OpenSSH scp": lambda r=remote: _cli(["scp", "-q", "-P", str(server.port), *opts,
                                                      f"{server.user}@127.0.0.1:{r}", str(dest)], dest),
                "rsync (defaults)": lambda r=remote: _cli(["rsync", "-e", " ".join(["ssh", "-p", str(server.port),
                                                                                    *opts]),
                                                           f"{server.user}@127.0.0.1:{r}", str(dest)], dest),
            }
            times: dict[str, list[float]] = {name: [] for name in tools}
            for _ in range(reps):
                for name, tool in tools.items():
                    times[name].append(tool())
            times["SFTPHook (defaults)"] = [_hook(remote, dest, "bench_ssh_defaults") for _ in range(hook_reps)]
            times["SFTPHook (compress off)"] = [_hook(remote, dest, "bench_ssh") for _ in range(hook_reps)]
            for name, values in times.items():
                seconds = statistics.median(values)
                rows.setdefault(name, {})[f"{size_mb}MB"] = {"seconds": round(seconds, 3),
                                                             "mb_per_s": round(size_mb * 1.048576 / seconds, 1),
                                                             "runs": [round(v, 3) for v in values]}
            shutil.rmtree(box)
        resume = _resume(endpoint, server, work, 200)
    ref = "OpenSSH sftp"
    ours = "lora-deploy (auto: rsync), transfer+verify"
    ratios = {size: rows[ours][size]["mb_per_s"] / rows[ref][size]["mb_per_s"] for size in rows[ref]}
    e2e = {size: rows["lora-deploy (auto: rsync), end to end"][size]["mb_per_s"] / rows[ref][size]["mb_per_s"]
           for size in rows[ref]}
    return {
        "ratio_vs_sftp": round(min(ratios.values()), 3),
        "ratio_vs_sftp_by_size": {k: round(v, 3) for k, v in ratios.items()},
        "ratio_vs_sftp_end_to_end_by_size": {k: round(v, 3) for k, v in e2e.items()},
        "resume_resent_fraction": resume["resent_fraction"],
        "resume": resume,
        "tools": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
                    "rsync": subprocess.run(["rsync", "--version"], capture_output=True,
                                            text=True).stdout.splitlines()[0]},
        "command": "cd /work/main && .venv/bin/python -m bench.transfer.run --sizes 200,1000 --reps 3",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _drop_option_pairs(argv: list[str], *drop: str) -> list[str]:
    """Remove the ``flag value`` pairs (ssh_command's argv is all pairs) whose flag or value is in ``drop``."""
    pairs = zip(argv[::2], argv[1::2], strict=True)
    return [item for flag, value in pairs if flag not in drop and value not in drop for item in (flag, value)]


def _make_checkpoint(box: Path, size_mb: int) -> str:
    checkpoint = box / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text('{"peft_type": "LORA"}\n')
    weights = checkpoint / "adapter_model.safetensors"
    with weights.open("wb") as handle:
        for _ in range(size_mb):
            handle.write(os.urandom(1 << 20))
    subprocess.run(["cat", str(weights)], stdout=subprocess.DEVNULL, check=True)  # warm cache
    return str(weights)


def _ours(endpoint: Any, box: Path, work: Path, method: str) -> tuple[float, float]:
    from include.source.download import download_adapter
    from include.source.endpoint import connect
    from include.source.ssh import SSHSource
    from include.store.artifacts import ArtifactStore

    store_root = work / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    started = time.perf_counter()
    client = connect(endpoint)
    source = SSHSource(client, str(box), endpoint=endpoint, method=method)  # type: ignore[arg-type]
    record = download_adapter(source, ArtifactStore(store_root), "bench")
    total = time.perf_counter() - started
    source.close()
    client.close()
    shutil.rmtree(store_root, ignore_errors=True)
    return record["transfer"]["seconds"], total


def _cli(argv: list[str], dest: Path) -> float:
    dest.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def _hook(remote: str, dest: Path, conn_id: str) -> float:
    from airflow.providers.sftp.hooks.sftp import SFTPHook

    dest.unlink(missing_ok=True)
    started = time.perf_counter()
    hook = SFTPHook(ssh_conn_id=conn_id)
    hook.retrieve_file(remote, str(dest))
    hook.close_conn()
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def _resume(endpoint: Any, server: Any, work: Path, size_mb: int) -> dict[str, Any]:
    """Kill the session at half the file, resume, and compare re-sent with already-received bytes."""
    from include.errors import TransientSourceError
    from include.source.download import download_adapter
    from include.source.endpoint import connect
    from include.source.ssh import SSHSource
    from include.store.artifacts import ArtifactStore

    box = work / "box-resume"
    _make_checkpoint(box, size_mb)
    store = ArtifactStore(work / "store-resume")
    size = size_mb << 20
    done = threading.Event()

    def cutter() -> None:
        while not done.is_set():
            partials = list(store.root.glob("*/adapter/.partial-*/adapter_model.safetensors"))
            if partials and partials[0].stat().st_size >= size // 2:
                _kill_sessions(server.process.pid)
                done.set()
            done.wait(0.002)

    def attempt() -> dict[str, Any]:
        client = connect(endpoint)
        try:
            return download_adapter(SSHSource(client, str(box), endpoint=endpoint), store, "bench")
        finally:
            client.close()

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        attempt()
        raise RuntimeError("the transfer finished before the cut")
    except TransientSourceError:
        pass
    done.set()
    thread.join()
    kept = next(store.root.glob("*/adapter/.partial-*/adapter_model.safetensors")).stat().st_size
    record = attempt()
    received = record["transfer"]["received_bytes"]
    resent = max(received - (size - kept), 0)
    shutil.rmtree(box)
    shutil.rmtree(store.root)
    return {"file_bytes": size, "kept_after_cut": kept, "received_on_retry": received, "resent_bytes": resent,
            "resent_fraction": round(resent / kept, 5), "method": record["transfer"]["method"]}


def _kill_sessions(master: int) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == master:
                os.kill(int(entry.name), signal.SIGKILL)


def markdown(result: dict[str, Any]) -> str:
    """The table for docs/benchmarks.md."""
    sizes = list(next(iter(result["tools"].values())).keys())
    lines = ["| tool | " + " | ".join(f"{s} MB/s (s)" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name, by_size in result["tools"].items():
        cells = [f"{by_size[s]['mb_per_s']} ({by_size[s]['seconds']})" if s in by_size else "-" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"ratio_vs_sftp (transfer+verify, min over sizes): {result['ratio_vs_sftp']}; by size "
                 f"{result['ratio_vs_sftp_by_size']}; end to end {result['ratio_vs_sftp_end_to_end_by_size']}")
    lines.append(f"resume_resent_fraction: {result['resume_resent_fraction']} ({result['resume']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
