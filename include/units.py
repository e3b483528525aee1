"""How a byte count is written for people, everywhere: Slack, the model card, the Deployments page, the task logs.

Decimal units (1 MB = 10^6 bytes, as disks and the Hub count): ``1.83 GB`` from 1 GB up, ``1.8 MB`` from 1 MB up,
``512 kB`` below. The Deployments page's script (``include/deployments/page/index.html``, ``size()``) writes the
same strings; ``tests/e2e/test_deployments_page.py`` compares them.
"""

from __future__ import annotations


def format_bytes(num_bytes: float) -> str:
    """``1_830_000`` -> ``'1.8 MB'``; ``15_235_393_632`` -> ``'15.24 GB'``; ``2_048`` -> ``'2 kB'``."""
    if abs(num_bytes) >= 1e9:
        return f"{num_bytes / 1e9:.2f} GB"
    if abs(num_bytes) >= 1e6:
        return f"{num_bytes / 1e6:.1f} MB"
    return f"{num_bytes / 1e3:.0f} kB"
